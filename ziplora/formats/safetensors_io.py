"""A strict safetensors reader and a streaming, atomic writer.

Why our own: the reader must turn any damaged or hostile file into a ``LoraFormatError`` without large
allocations (the header is size-checked against the file before it is parsed, tensors are read one at a
time), and the writer streams tensors to a temporary file beside the target, hashing the data as it goes,
then renames it into place, so a failed write never leaves a partial file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ziplora.errors import JobFailed, LoraFormatError

__all__ = [
    "TensorInfo",
    "SafetensorsFile",
    "PendingTensor",
    "write_safetensors",
    "stage_safetensors",
    "stage_file",
    "stage_bytes",
    "StagedFile",
    "atomic_write",
    "atomic_write_bytes",
    "write_failed",
    "addnet_hash",
    "MAX_HEADER_BYTES",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_TENSORS = 200_000

_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES["F8_E4M3"] = (torch.float8_e4m3fn, 1)
    _DTYPES["F8_E5M2"] = (torch.float8_e5m2, 1)
_NAME_OF_DTYPE = {v[0]: k for k, v in _DTYPES.items()}

_PICKLE_MAGICS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset into the data section
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsFile:
    """A validated safetensors header plus lazy, one-tensor-at-a-time reads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._parse()
        except OSError as err:  # unreadable (permissions, I/O error, removed meanwhile): one line, not a traceback
            raise self._unreadable(err) from None

    def _unreadable(self, err: OSError) -> LoraFormatError:
        return self._fail(f"cannot be read ({err.strerror or err})")

    def _open(self) -> BinaryIO:
        try:
            return self.path.open("rb")
        except OSError as err:
            raise self._unreadable(err) from None

    def _fail(self, why: str) -> LoraFormatError:
        return LoraFormatError(f"{self.path.name}: {why}")

    def _parse(self) -> None:
        path = self.path
        if not path.is_file():
            raise LoraFormatError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl"):
            raise LoraFormatError(
                f"{path.name}: pickle files ({suffix}) are refused, since loading one can run code; convert it to .safetensors first"
            )
        size = path.stat().st_size
        if size == 0:
            raise self._fail("the file is empty")
        with path.open("rb") as f:
            head = f.read(8)
            (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            plausible = 0 < header_len <= MAX_HEADER_BYTES and 8 + header_len <= size
            first = f.read(1) if plausible else b""
            if first != b"{" and (head[:2] in _PICKLE_MAGICS or head[:4] == b"PK\x03\x04"):
                # a header length whose bytes happen to match a pickle's start is told apart by the "{"
                raise self._fail("this is a pickle (PyTorch .pt/.ckpt) file, which is refused; convert it to .safetensors")
            if len(head) < 8:
                raise self._fail(f"truncated: {size} bytes is too short for a safetensors file")
            if header_len == 0 or header_len > MAX_HEADER_BYTES:
                raise self._fail(f"not a safetensors file (header length {header_len})")
            if 8 + header_len > size:
                raise self._fail(f"truncated or corrupt: the header claims {header_len} bytes but the file has {size - 8}")
            raw = first + f.read(header_len - 1)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise self._fail(f"corrupt header ({type(err).__name__})") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt header (not a JSON object)")
        self._data_offset = 8 + header_len
        data_size = size - self._data_offset
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise self._fail("corrupt header (__metadata__ must map strings to strings)")
        self.metadata = dict(meta)
        if len(header) > MAX_TENSORS:
            raise self._fail(f"too many tensors ({len(header)})")
        spans = []
        for name, entry in header.items():
            info = self._tensor_info(name, entry, data_size)
            self.tensors[name] = info
            spans.append((info.start, info.end))
        spans.sort()
        for (_s0, e0), (s1, _) in zip(spans, spans[1:]):
            if s1 < e0:
                raise self._fail("corrupt header (tensor data overlaps)")

    def _tensor_info(self, name: str, entry: object, data_size: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"corrupt header entry for {name!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPES:
            raise self._fail(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
        ):
            raise self._fail(f"tensor {name!r} has a bad shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            raise self._fail(f"tensor {name!r} has bad data offsets")
        start, end = offsets
        info = TensorInfo(name, dtype, tuple(shape), start, end)
        if not 0 <= start <= end <= data_size:
            raise self._fail(f"truncated or corrupt: tensor {name!r} lies outside the file")
        if info.numel * _DTYPES[dtype][1] != end - start:
            raise self._fail(f"corrupt header: tensor {name!r} of shape {list(shape)} does not match its byte size")
        return info

    @contextmanager
    def reader(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """Yields ``read(name) -> tensor`` over one open file handle."""
        with self._open() as f:
            yield lambda name: self._read(f, name)

    def read(self, name: str) -> torch.Tensor:
        with self._open() as f:
            return self._read(f, name)

    def _read(self, f: BinaryIO, name: str) -> torch.Tensor:
        info = self.tensors[name]
        torch_dtype, _ = _DTYPES[info.dtype]
        f.seek(self._data_offset + info.start)
        nbytes = info.end - info.start
        buf = bytearray(nbytes)
        try:
            got = f.readinto(buf)
        except OSError as err:
            raise self._unreadable(err) from None
        if got != nbytes:
            raise self._fail(f"truncated: tensor {name!r} could not be read whole")
        if nbytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype)
        return torch.frombuffer(buf, dtype=torch_dtype).reshape(info.shape)

    def data_hash(self) -> str:
        """The addnet hash (A1111's LoRA hash): sha256 of everything after the header."""
        h = hashlib.sha256()
        with self._open() as f:
            f.seek(self._data_offset)
            try:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            except OSError as err:
                raise self._unreadable(err) from None
        return h.hexdigest()


def addnet_hash(path: str | Path) -> str:
    return SafetensorsFile(path).data_hash()


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write, produced on demand so a whole file never sits in memory at once."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16 or t.dtype not in (torch.float32, torch.float16, torch.float64):
        return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return t.numpy().tobytes()


def write_safetensors(
    path: str | Path,
    tensors: Iterable[PendingTensor] | dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> str:
    """Write atomically; returns the addnet hash of the data written.

    ``tensors`` is either a dict (written in key order) or a list of ``PendingTensor`` whose producers
    are called one at a time in order.
    """
    digest, staged = stage_safetensors(path, tensors, metadata, overwrite)
    try:
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return digest


def stage_safetensors(
    path: str | Path,
    tensors: Iterable[PendingTensor] | dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> tuple[str, StagedFile]:
    """Write the whole file under a temporary name beside ``path``; the caller commits or discards it.

    Returns (addnet hash, staged file). Several files written together (a LoRA and its companions) are all
    staged first and committed last, so running out of space on any of them changes nothing on disk.
    """
    if isinstance(tensors, dict):
        pending = [PendingTensor(k, v.dtype, tuple(v.shape), (lambda v=v: v)) for k, v in tensors.items()]
    else:
        pending = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for p in pending:
        if p.dtype not in _NAME_OF_DTYPE:
            raise ValueError(f"cannot write dtype {p.dtype}")
        n = 1
        for d in p.shape:
            n *= d
        nbytes = n * torch.empty((), dtype=p.dtype).element_size()
        header[p.name] = {"dtype": _NAME_OF_DTYPE[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()

    def body(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for p in pending:
            t = p.produce()
            if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
                raise ValueError(f"tensor {p.name} came out as {tuple(t.shape)} {t.dtype}, expected {p.shape} {p.dtype}")
            data = _tensor_bytes(t)
            digest.update(data)
            f.write(data)

    staged = stage_file(Path(path), body, overwrite=overwrite)
    return digest.hexdigest(), staged


def write_failed(path: Path, err: OSError) -> JobFailed:
    """One readable line for a write the system refused (disk full, read-only folder, no permission, ...)."""
    reason = err.strerror or str(err) or type(err).__name__
    return JobFailed(f"cannot write {path.name} in {path.parent}: {reason}; nothing was written")


class _Sink:
    """The temporary file as ``body`` sees it: whole writes, and the system's refusals as one-line errors
    (a disk that fills up is not an internal error)."""

    def __init__(self, raw: BinaryIO, path: Path) -> None:
        self._raw, self._path = raw, path

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                n = self._raw.write(view[done:])
            except OSError as err:
                raise write_failed(self._path, err) from None
            if not n:
                raise write_failed(self._path, OSError(errno.EIO, "the file system accepted no more data"))
            done += n
        return done


# link() failures that mean "this file system has no hard links", not "the target exists"
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


class StagedFile:
    """A complete, synced file under a temporary name beside its target.

    ``commit`` puts it in place: a rename when overwriting, else a hard link that fails if the target appeared
    in the meantime (another process writing the same name), so an existing file is never replaced silently.
    ``discard`` removes it. Either leaves no temporary file behind.
    """

    def __init__(self, path: Path, tmp: str, overwrite: bool) -> None:
        self.path, self.tmp, self.overwrite = path, tmp, overwrite

    def commit(self) -> None:
        if self.tmp is None:
            return
        try:
            if self.overwrite:
                os.replace(self.tmp, self.path)
            else:
                try:
                    os.link(self.tmp, self.path)
                except FileExistsError:
                    raise _appeared(self.path) from None
                except OSError as err:
                    if err.errno not in _NO_HARD_LINKS:
                        raise
                    if self.path.exists():
                        raise _appeared(self.path) from None
                    os.replace(self.tmp, self.path)
                    self.tmp = None
                    return
                try:  # the target is in place: the temporary name is only a second link to it now
                    os.unlink(self.tmp)
                except OSError:
                    pass
        except OSError as err:
            raise write_failed(self.path, err) from None
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def _appeared(path: Path) -> Exception:
    from ziplora.errors import OutputExistsError

    return OutputExistsError(
        f"{path.name} appeared in {path.parent} while this was being written; choose another name or allow overwriting"
    )


def stage_file(path: Path, body: Callable[[BinaryIO], None], overwrite: bool = False) -> StagedFile:
    """Write ``body`` to a temporary file beside ``path`` and sync it; nothing is left behind on any failure."""
    if path.exists() and not overwrite:
        from ziplora.errors import OutputExistsError

        raise OutputExistsError(f"{path.name} exists; choose another name or allow overwriting")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except OSError as err:
        raise write_failed(path, err) from None
    try:
        # unbuffered: every write reaches the system inside ``_Sink``, so closing has nothing left to fail on
        with os.fdopen(fd, "wb", buffering=0) as f:
            body(_Sink(f, path))  # type: ignore[arg-type]
            try:
                os.fsync(f.fileno())
            except OSError as err:
                raise write_failed(path, err) from None
        try:
            os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; a LoRA is an ordinary file
        except OSError as err:
            raise write_failed(path, err) from None
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return StagedFile(path, tmp_name, overwrite)


def atomic_write(path: Path, body: Callable[[BinaryIO], None], overwrite: bool = False) -> None:
    """Write through a temporary file in the same folder, fsync, then rename; never a partial target."""
    staged = stage_file(path, body, overwrite=overwrite)
    try:
        staged.commit()
    except BaseException:
        staged.discard()
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide and not thread-safe


def atomic_write_bytes(path: Path, data: bytes, overwrite: bool = False) -> None:
    atomic_write(path, lambda f: f.write(data), overwrite=overwrite)


def stage_bytes(path: Path, data: bytes, overwrite: bool = False) -> StagedFile:
    return stage_file(path, lambda f: f.write(data), overwrite=overwrite)
