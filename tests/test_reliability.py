"""The reliability sweep (docs/reliability.md): every bad input and every fault, through every face.

Faces: ``core`` (``ziplora.jobs.run_merge``, the call the other three make), ``cli`` (``ziplora.cli.main``), ``api``
(a FastAPI TestClient over ``ziplora.api.mount``) and ``ui`` (the tab's ``TabHandlers``), all on one toy host over
an untrained ToyXL; host-specific faults also on the A1111 and Forge stand-ins. After every row and face one
helper, ``assert_intact``, checks what is guaranteed: the model's parameters and buffers hash equal to before,
its flags are back, no ``ZipLayer``, instance ``forward`` or hook is left in its module tree, no lock is held,
no temporary file is left, and the LoRA folder is unchanged (names, sizes, mtimes) but for a completed output.

What each face shows for a failure is one readable line: the CLI exits 2 (1 for an internal error, 130 for
Ctrl-C) with exactly one line on stderr; the API answers 4xx/5xx ``{"error": line}`` or a job whose ``error`` is
the line; the tab shows the line in its status box. Row ids are the ids of docs/reliability.md.

Faults are injected, not provoked: out-of-memory is raised from the session's ``predict``; disk full, a read-only
folder and refused permissions are raised from the writer's ``os`` / ``tempfile`` calls (tests run as root,
where ``chmod`` does not stop writes); fp16 overflow comes from a host stub that computes in "fp16".
"""

from __future__ import annotations

import errno
import html
import os
import pickle
import re
import struct
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save
from torch import nn

from tests.conftest import state_hash
from ziplora import cli, ui
from ziplora.api import mount
from ziplora.errors import ZipLoraError
from ziplora.formats import Family, LayerKey, open_lora
from ziplora.formats import safetensors_io as sio
from ziplora.formats.keys import kohya_name, sgm_unet_to_diffusers
from ziplora.hosts.base import SessionOptions
from ziplora.hosts.toy import ToyHost, ToySession
from ziplora.jobs import reexport, run_merge
from ziplora.merge.patch import ZipLayer
from ziplora.progress import Progress
from ziplora.request import MergeRequest
from ziplora.service import MergeService
from ziplora.synthetic import attention_layers, random_lora_tensors, write_random_lora

try:
    import gradio as gr
except ImportError:  # only the tab's face needs gradio; the other faces run without it
    gr = None

FACES = ("core", "cli", "api", "ui") if gr is not None else ("core", "cli", "api")
needs_gradio = pytest.mark.skipif(gr is None, reason="the tab needs gradio")
FAST = dict(steps=3, sampling_steps=2, samples=1)
OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
PREFIX = "/ziplora/v1"


def _keys() -> list[LayerKey]:
    """A small but real set of layers: two transformer blocks' attention and projections (fast merges)."""
    keys = attention_layers(Family.TOYXL)
    return [k for k in keys if k.path.startswith(("input_blocks.4.1.", "output_blocks.2.1."))][:24]


# ---------------------------------------------------------------------------------------------------------------
# the world: one toy host, its folder, and the four faces over it


@dataclass
class World:
    folder: Path
    host: ToyHost
    model: nn.Module
    service: MergeService
    client: TestClient
    handlers: ui.TabHandlers
    capsys: Any
    hook: Callable[[Progress], None] | None = None

    def path(self, name: str) -> Path:
        """A LoRA in the folder by stem (``subject``) or file name (``bad.ckpt``); absolute paths stay."""
        p = Path(name)
        if p.is_absolute():
            return p
        return self.folder / (name if p.suffix else f"{name}.safetensors")


class HalfSession:
    """A toy session that computes "in fp16" (predictions cast to the session dtype), as SDXL does on a GPU, and
    overflows where its host says: predictions times ``factor`` from the ``after``-th call with gradients."""

    def __init__(self, inner: ToySession, dtype: torch.dtype, host: HalfToyHost) -> None:
        self._inner, self.dtype, self._host, self._calls = inner, dtype, host, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self._inner.predict(x.float(), t, {k: v.float() for k, v in cond.items()})
        factor = self._host.overflow.get("fp16" if self.dtype == torch.float16 else "fp32")
        if factor is not None:
            grad = torch.is_grad_enabled()
            self._calls += grad
            if (grad and self._calls >= self._host.after) or (not grad and self._host.teachers):
                out = out * factor
        return out.to(self.dtype)


class HalfToyHost(ToyHost):
    """The toy model behind a host whose ``auto`` precision is fp16; ``fp32`` False: it cannot run in fp32."""

    def __init__(self, folder: Path, model: nn.Module, overflow: dict[str, float], after: int = 2,
                 teachers: bool = False, fp32: bool = True) -> None:  # fmt: skip
        super().__init__(folder, model=model)
        self.overflow, self.after, self.teachers, self.fp32 = overflow, after, teachers, fp32

    @contextmanager
    def session(self, options: SessionOptions, progress: Progress) -> Iterator[HalfSession]:  # type: ignore[override]
        from ziplora.errors import HostError

        if options.precision == "fp32" and not self.fp32:
            raise HostError("float32 was asked for but this WebUI runs the UNet in float16; start it with --no-half")
        dtype = torch.float32 if options.precision == "fp32" else torch.float16
        with super().session(replace(options, precision="fp32"), progress) as inner:
            yield HalfSession(inner, dtype, self)


def _make_world(tmp_path: Path, model: nn.Module, monkeypatch: pytest.MonkeyPatch, capsys: Any,
                host_factory: Callable[[Path], ToyHost] | None = None) -> World:  # fmt: skip
    folder = tmp_path / "Lora"
    folder.mkdir()
    keys = _keys()
    write_random_lora(folder / "subject.safetensors", keys, Family.TOYXL, rank=4, seed=1, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "sks shape"})  # fmt: skip
    write_random_lora(folder / "style.safetensors", keys, Family.TOYXL, rank=4, seed=2, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "zwx style"})  # fmt: skip
    host = host_factory(folder) if host_factory else ToyHost(folder, model=model)
    service = MergeService(host)
    app = FastAPI()
    mount(app, service)
    world = World(folder, host, model, service, TestClient(app), ui.TabHandlers(service), capsys)

    real_on_change = Progress.on_change

    def on_change(self: Progress) -> None:  # every progress report of every face passes here
        real_on_change(self)
        if world.hook is not None:
            world.hook(self)

    monkeypatch.setattr(Progress, "on_change", on_change)
    real_host = cli._host
    monkeypatch.setattr(cli, "_host", lambda name, where: host if name == "toy" else real_host(name, where))
    monkeypatch.setattr(ui.handlers, "POLL_SECONDS", 0.01)
    # the tab's plots are tested in test_ui.py; here only its status line matters, and matplotlib is slow
    monkeypatch.setattr(ui.plots, "loss_figure", lambda records: None)
    monkeypatch.setattr(ui.plots, "similarity_figure", lambda before, after: None)
    return world


@pytest.fixture()
def world(tmp_path: Path, untrained_model, monkeypatch: pytest.MonkeyPatch, capsys) -> World:  # type: ignore[no-untyped-def]
    return _make_world(tmp_path, untrained_model, monkeypatch, capsys)


# ---------------------------------------------------------------------------------------------------------------
# what is guaranteed after every row


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` (hidden ones too): relative name -> (size, mtime_ns)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            s = p.stat()
            out[p.relative_to(folder).as_posix()] = (s.st_size, s.st_mtime_ns)
    return out


@dataclass(frozen=True)
class Before:
    model: dict[str, bytes]
    flags: list[bool]
    training: bool
    files: dict[str, tuple[int, int]]


def snapshot(world: World) -> Before:
    m = world.model
    return Before(state_hash(m), [p.requires_grad for p in m.parameters()], m.training, listing(world.folder))


def assert_model_clean(model: nn.Module) -> None:
    """No wrapped layer, no instance forward (gradient checkpointing) and no hook left anywhere in the tree."""
    assert not [n for n, m in model.named_modules() if isinstance(m, ZipLayer)], "a ZipLayer was left in the model"
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__], "an instance forward was left"
    assert not [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]


def assert_intact(world: World, before: Before, written: str | None = None, extra: dict[str, bytes] | None = None) -> None:
    """The model as it was, nothing held, nothing stray; the folder as it was but for ``written`` (a completed
    output and its companions) and ``extra`` (files the test itself put there, with their exact bytes)."""
    m = world.model
    assert state_hash(m) == before.model, "the model's parameters or buffers changed"
    assert [p.requires_grad for p in m.parameters()] == before.flags and m.training == before.training
    assert_model_clean(m)
    assert not world.host._lock.locked(), "the host's model lock is still held"
    assert world.service.running() is None, "the service still counts a job as running"
    now = listing(world.folder)
    assert not [n for n in now if n.endswith(".tmp")], f"temporary files left: {now}"
    changed = sorted(n for n, meta in before.files.items() if now.get(n) != meta)
    allowed = set(extra or {})
    if written:
        allowed |= {f"{written}.safetensors", f"{written}.json", f"{written}.ziplora"}
    assert not [n for n in changed if n not in allowed], f"files changed or removed: {changed}"
    new = set(now) - set(before.files)
    assert new <= allowed, f"unexpected new files: {sorted(new - allowed)}"
    for name, data in (extra or {}).items():
        assert (world.folder / name).read_bytes() == data, f"{name} was changed"
    if written:
        out = world.folder / f"{written}.safetensors"
        assert out.is_file() and len(open_lora(out).keys) > 0, "the output is not a complete LoRA"


def remove_output(world: World, name: str) -> None:
    for suffix in (".safetensors", ".json", ".ziplora"):
        (world.folder / f"{name}{suffix}").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# the four faces


@dataclass
class Outcome:
    face: str
    ok: bool
    line: str = ""
    code: int | None = None  # CLI exit status, or the HTTP status of the POST
    state: str | None = None  # the API job's state
    notes: list[str] = field(default_factory=list)
    losses: int | None = None

    def check_line(self) -> None:
        assert not self.ok, f"{self.face}: expected a failure"
        assert self.line and "\n" not in self.line and "Traceback" not in self.line and len(self.line) < 700, (self.face, self.line)


Between = Callable[[str | None], None]  # the test thread's turn while a job runs (job id, or None in the tab)


def run_core(world: World, content: str, style: str, name: str = "out", **kw: Any) -> Outcome:
    request = MergeRequest(content=content, style=style, output_name=name, **{**FAST, **kw})
    try:
        outcome = run_merge(request, world.host, Progress())
    except ZipLoraError as err:
        return Outcome("core", False, str(err))
    except Exception as err:  # noqa: BLE001 - not ours: each face turns it into "internal error: ..."
        return Outcome("core", False, f"internal error: {type(err).__name__}: {' '.join(str(err).split())}")
    return Outcome("core", True, notes=list(outcome.notes))


def run_cli(world: World, content: str, style: str, name: str = "out", *, method: str = "zip", overwrite: bool = False,
            out: Path | None = None, precision: str | None = None, **_: Any) -> Outcome:  # fmt: skip
    target = out or world.folder / f"{name}.safetensors"
    argv = ["merge", "--method", method, "--host", "toy", "--content", str(world.path(content)), "--style",
            str(world.path(style)), "--out", str(target), "--steps", "3", "--samples", "1", "--sampling-steps", "2"]  # fmt: skip
    if overwrite:
        argv.append("--overwrite")
    code = cli.main(argv)
    captured = world.capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    if code == 0:
        notes = [line.split("note: ", 1)[1] for line in captured.out.splitlines() if "note: " in line]
        return Outcome("cli", True, code=0, notes=notes)
    lines = captured.err.splitlines()
    assert len(lines) == 1, f"exit {code} with stderr {captured.err!r}"
    return Outcome("cli", False, lines[0], code=code)


def _poll(world: World, job_id: str, between: Between | None) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        r = world.client.get(f"{PREFIX}/jobs/{job_id}")
        assert r.status_code == 200, r.text
        data = r.json()
        if data["state"] != "running":
            return data
        assert time.monotonic() < deadline, "the job never ended"
        if between is not None:
            between(job_id)
        time.sleep(0.01)


def run_api(world: World, content: str, style: str, name: str = "out", *, between: Between | None = None,
            body: dict[str, Any] | None = None, **kw: Any) -> Outcome:  # fmt: skip
    payload = body if body is not None else {"content": content, "style": style, "output_name": name, **FAST, **kw}
    r = world.client.post(f"{PREFIX}/merge", json=payload)
    return api_outcome(world, r, between)


def api_outcome(world: World, r: Any, between: Between | None = None) -> Outcome:
    assert r.headers["content-type"].startswith("application/json"), r.text
    data = r.json()
    if r.status_code != 202:
        assert 400 <= r.status_code < 600 and set(data) == {"error"}, (r.status_code, data)
        return Outcome("api", False, data["error"], code=r.status_code)
    job = _poll(world, data["job_id"], between)
    if job["state"] == "done":
        return Outcome("api", True, code=202, state="done", notes=list(job["result"]["notes"]), losses=len(job["losses"]))
    assert job["state"] in ("failed", "interrupted"), job
    return Outcome("api", False, job["error"], code=202, state=job["state"])


_MSG = re.compile(r'<div class="ziplora-msg ziplora-msg-(\w+)">(.*)</div>', re.S)


def _status(html_text: Any) -> tuple[str, str]:
    m = _MSG.fullmatch(str(html_text))
    assert m is not None, html_text
    return m.group(1), html.unescape(m.group(2))


def ui_values(subject: str, style: str, name: str, **kw: Any) -> list[Any]:
    values = {
        **ui.controls.form_defaults(),
        "subject": subject, "style": style, "subject_prompt": "", "style_prompt": "", "inputs": next(iter(ui.INPUT_CHOICES)),
        "subject_images": None, "style_image": None, "steps": 3, "lam": 0.01, "lr": 0.01, "resolution": 0, "samples": 1,
        "sampling_steps": 2, "seed": 0, "stop_similarity": 0.01, "precision": "auto", "similarity": "dot",
        "gradient_checkpointing": True, "output_name": name, "style_multiplier": 1.0, "target_rank": 0, "overwrite": False,
    }  # fmt: skip
    values.update(kw)
    return [values[f] for f in ui.ZIP_FIELDS]


def run_ui(world: World, content: str, style: str, name: str = "out", *, between: Between | None = None, **kw: Any) -> Outcome:
    kw.pop("method", None)  # the tab always zips
    last = None
    for item in world.handlers.zip(*ui_values(content, style, name, **kw)):
        assert len(item) == len(ui.ZIP_OUTPUTS)
        last = item
        if between is not None:
            between(None)
    assert last is not None
    kind, text = _status(last[0])
    if kind == "ok":
        notes = re.findall(r"Note: ([^<]*)", str(last[2]))
        return Outcome("ui", True, notes=[html.unescape(n) for n in notes])
    assert kind == "error", last[0]
    return Outcome("ui", False, text)


RUNNERS: dict[str, Callable[..., Outcome]] = {"core": run_core, "cli": run_cli, "api": run_api, "ui": run_ui}


# ---------------------------------------------------------------------------------------------------------------
# files: bad LoRA files (F rows)


def _toy(seed: int = 5, **kw: Any) -> dict[str, torch.Tensor]:
    return {k: v.half() for k, v in random_lora_tensors(_keys()[:4], Family.TOYXL, 4, seed, scale=0.3, **kw).items()}


def _bytes(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, meta)


def _raw(header: object, data: bytes = b"", claimed: int | None = None) -> bytes:
    raw = __import__("json").dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


class _Payload:
    """A pickle that creates a marker file when (and only if) something unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def _pickled(marker: Path, zipped: bool) -> bytes:
    if not zipped:
        return pickle.dumps({"lora_unet_x.lora_down.weight": _Payload(marker)}, protocol=4)
    import io

    buf = io.BytesIO()
    torch.save({"payload": _Payload(marker)}, buf)  # the zip format of torch.save, with a pickle inside
    return buf.getvalue()


def _nan(value: float) -> Callable[[Path], bytes]:
    def make(_: Path) -> bytes:
        t = _toy()
        t[next(k for k in t if k.endswith("lora_up.weight"))][0, 0] = value
        return _bytes(t)

    return make


def _mismatched(_: Path) -> bytes:
    t = _toy()
    up = next(k for k in t if k.endswith("lora_up.weight"))
    t[up] = t[up][:, :3].contiguous()  # rank 3 up, rank 4 down
    return _bytes(t)


def _wrong_width(_: Path) -> bytes:
    n = kohya_name(_keys()[0])
    return _bytes({f"{n}.lora_down.weight": torch.randn(4, 7), f"{n}.lora_up.weight": torch.randn(32, 4)})


def _duplicate(_: Path) -> bytes:
    key = _keys()[2]  # a layer _toy() writes in kohya form, written again in diffusers form
    t = _toy()
    d = "lora_unet_" + sgm_unet_to_diffusers(key.path).replace(".", "_")
    t[f"{d}.lora_down.weight"] = torch.randn(4, 32).half()
    t[f"{d}.lora_up.weight"] = torch.randn(32, 4).half()
    return _bytes(t)


def _bad_bias_delta() -> bytes:
    """A LyCORIS full layer (diff) beside the LoRA layers, whose bias delta (diff_b) fits no bias of its layer."""
    n = kohya_name(_keys()[5])
    return _bytes({**_toy(), f"{n}.diff": (torch.randn(32, 32) * 0.01).half(), f"{n}.diff_b": torch.zeros(5).half()})


def _family(tensors: dict[str, torch.Tensor]) -> Callable[[Path], bytes]:
    return lambda _: _bytes(tensors)


_SD1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
_REFINER = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
_FLUX = "lora_unet_double_blocks_0_img_attn_qkv"
_SD3 = "transformer.joint_blocks.0.x_block.attn.qkv"
_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@dataclass(frozen=True)
class FileRow:
    id: str
    make: Callable[[Path], bytes] | None  # the bytes of "bad.safetensors" (None: the row writes nothing)
    words: str  # in every face's line, unless overridden below
    content: str = "bad"
    style: str = "style"
    filename: str = "bad.safetensors"
    listed: bool = True  # the WebUI lists it (a .safetensors file); unlisted names are refused by name
    readable: bool = False  # each file alone is fine (the pickers' summary shows no error)
    api_words: str | None = None
    ui_words: str | None = None
    directory: bool = False


def _unlisted(row_id: str, filename: str, words: str, make: Callable[[Path], bytes] | None, directory: bool = False) -> FileRow:
    """A file the WebUI never lists: by path (core, CLI) refused as ``words``; by name (API, tab) not found."""
    return FileRow(row_id, make, words, content=filename, filename=filename, listed=False, directory=directory,
                   api_words="no LoRA named", ui_words="no such LoRA")  # fmt: skip


FILE_ROWS = [
    FileRow("F01-truncated", lambda _: _bytes(_toy())[:-40], "truncated"),
    FileRow("F02-truncated-inside-header", lambda _: _bytes(_toy())[:30], "truncated or corrupt"),
    FileRow("F03-too-short", lambda _: b"\x10\x00\x00", "too short"),
    FileRow("F04-empty", lambda _: b"", "the file is empty"),
    FileRow("F05-corrupt-header", lambda _: struct.pack("<Q", 11) + b'{"a": [1, 2', "corrupt header"),
    FileRow("F06-header-not-an-object", lambda _: _raw([1, 2]), "not a JSON object"),
    FileRow("F07-header-length-2^63", lambda _: struct.pack("<Q", 2**63) + b"{}", "header length"),
    FileRow(
        "F08-tensor-claims-2^78-elements",
        lambda _: _raw({f"{_REFINER}.lora_down.weight": {"dtype": "F16", "shape": [2**39, 2**39], "data_offsets": [0, 8]}}, b"\0" * 8),
        "does not match its byte size",
    ),  # fmt: skip
    FileRow(
        "F09-offsets-past-the-end",
        lambda _: _raw({f"{_REFINER}.lora_down.weight": {"dtype": "F16", "shape": [4], "data_offsets": [0, 2**50]}}, b"\0" * 8),
        "outside the file",
    ),  # fmt: skip
    FileRow(
        "F10-overlapping-tensors",
        lambda _: _raw(
            {
                n: {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}
                for n in (f"{_REFINER}.lora_down.weight", f"{_REFINER}.lora_up.weight")
            },
            b"\0" * 8,
        ),
        "overlaps",
    ),  # fmt: skip
    FileRow("F11-zero-tensors", lambda _: _raw({"__metadata__": {"ss_network_dim": "4"}}), "holds no tensors"),
    FileRow(
        "F12-unsupported-dtype",
        lambda _: _raw({f"{_REFINER}.alpha": {"dtype": "F4", "shape": [], "data_offsets": [0, 1]}}, b"\0"),
        "unsupported dtype",
    ),
    FileRow("F13-metadata-not-strings", lambda _: _raw({"__metadata__": {"ss_network_dim": 4}}), "__metadata__ must map strings"),
    FileRow("F14-nan-weights", _nan(float("nan")), "NaN or Inf"),
    FileRow("F15-inf-weights", _nan(float("inf")), "NaN or Inf"),
    FileRow("F16-mismatched-up-down", _mismatched, "mismatched shapes"),
    FileRow("F17-delta-fits-no-layer-of-the-model", _wrong_width, "this LoRA is for unknown"),
    FileRow("F18-duplicate-layer-two-naming-schemes", _duplicate, "appears twice"),
    FileRow("F19-unrecognised-tensor-names", lambda _: _bytes({"foo.weight": torch.ones(2)}), "this LoRA is for unknown"),
    _unlisted("F20-pickle-pt", "bad.pt", "pickle files (.pt) are refused", lambda d: _pickled(d / "UNPICKLED", False)),
    _unlisted("F21-pickle-ckpt", "bad.ckpt", "pickle files (.ckpt) are refused", lambda d: _pickled(d / "UNPICKLED", True)),
    _unlisted("F22-pickle-bin", "bad.bin", "pickle files (.bin) are refused", lambda d: _pickled(d / "UNPICKLED", False)),
    FileRow("F23-pickle-renamed-safetensors", lambda d: _pickled(d / "UNPICKLED", False), "this is a pickle"),
    FileRow("F24-torch-zip-renamed-safetensors", lambda d: _pickled(d / "UNPICKLED", True), "this is a pickle"),
    FileRow(
        "F25-lora-for-sd1",
        _family({f"{_SD1}.lora_down.weight": torch.randn(4, 768), f"{_SD1}.lora_up.weight": torch.randn(320, 4)}),
        "this LoRA is for SD1.x, not",
    ),
    FileRow(
        "F26-lora-for-sd2",
        _family({f"{_TE}.lora_down.weight": torch.randn(4, 1024), f"{_TE}.lora_up.weight": torch.randn(1024, 4)}),
        "this LoRA is for SD2.x, not",
    ),
    FileRow(
        "F27-lora-for-sd3",
        _family({f"{_SD3}.lora_A.weight": torch.randn(4, 1536), f"{_SD3}.lora_B.weight": torch.randn(4608, 4)}),
        "this LoRA is for SD3, not",
    ),
    FileRow(
        "F28-lora-for-flux",
        _family({f"{_FLUX}.lora_down.weight": torch.randn(4, 3072), f"{_FLUX}.lora_up.weight": torch.randn(9216, 4)}),
        "this LoRA is for Flux, not",
    ),
    FileRow(
        "F29-lora-for-sdxl-refiner",
        _family({f"{_REFINER}.lora_down.weight": torch.randn(4, 1280), f"{_REFINER}.lora_up.weight": torch.randn(768, 4)}),
        "this LoRA is for SDXL refiner, not",
    ),  # fmt: skip
    FileRow(
        "F30-lora-for-another-model-sdxl-on-toy",
        _family(random_lora_tensors([LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")], Family.SDXL, 4, 0)),
        "is for SDXL",
    ),  # fmt: skip
    FileRow(
        "F31-checkpoint-not-a-lora",
        _family(
            {
                "model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3),
                "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
            }
        ),
        "checkpoint, not a LoRA",
    ),  # fmt: skip
    FileRow("F32-dora", lambda _: _bytes({**_toy(), f"{kohya_name(_keys()[0])}.dora_scale": torch.ones(1, 32).half()}), "DoRA"),
    FileRow("F33-same-file-as-subject-and-style", None, "hold the same weights", content="subject", style="subject", readable=True),
    FileRow(
        "F34-same-weights-under-two-names",
        lambda d: (d / "subject.safetensors").read_bytes(),
        "hold the same weights",
        style="subject",
        readable=True,
    ),
    _unlisted("F35-missing-file", "gone.safetensors", "no such file", None),
    _unlisted("F36-folder-named-like-a-lora", "dir.safetensors", "no such file", None, directory=True),
    FileRow("F37-bias-delta-of-the-wrong-shape", lambda _: _bad_bias_delta(), "is not a bias delta"),
]


@pytest.fixture()
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unpickling during the row fails the test (besides the marker file the payload would create)."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("something unpickled a file")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)


@pytest.mark.parametrize("row", FILE_ROWS, ids=[r.id for r in FILE_ROWS])
def test_bad_files(world: World, row: FileRow, no_unpickling: None) -> None:
    target = world.folder / row.filename
    if row.directory:
        target.mkdir()
    elif row.make is not None:
        target.write_bytes(row.make(world.folder))
    for face in FACES:
        for method in ("zip", "direct") if face == "cli" else ("zip",):
            before = snapshot(world)
            content = row.content
            if face == "core" and not row.listed:
                content = str(world.path(row.content))  # the core also takes paths (the CLI's way)
            elif face == "ui" and row.listed:
                content = Path(row.content).stem  # the picker's label
            outcome = RUNNERS[face](world, content, row.style, method=method)
            outcome.check_line()
            words = {"api": row.api_words, "ui": row.ui_words}.get(face) or row.words
            assert words in outcome.line, (face, method, outcome.line)
            if face == "cli":
                assert outcome.code == 2 and outcome.line.startswith("error: "), outcome
            if face == "api" and not row.listed:
                assert outcome.code == 404, outcome
            assert_intact(world, before)
    if row.listed:  # the picker's summary: the header's verdict at pick time (weights are checked at Zip)
        kind, text = _status(world.handlers.summary(Path(row.content).stem))
        assert "\n" not in text
        try:
            open_lora(world.path(row.content), expect=world.host.families)
        except ZipLoraError as err:
            assert kind == "error" and text == str(err), text
        else:
            assert kind == "ok", text
    assert not (world.folder / "UNPICKLED").exists(), "a pickle was unpickled"


# ---------------------------------------------------------------------------------------------------------------
# names (N rows: refused; A rows: accepted)


@dataclass(frozen=True)
class NameRow:
    id: str
    name: str
    words: str | None  # None: accepted
    cli: bool = True  # False: the CLI's --out is a path, so a name with folders is a path there, not an error
    written: str | None = None  # accepted: the file's stem as written (NFC)


NAME_ROWS = [
    NameRow("N01-slash", "a/b", "plain file name", cli=False),
    NameRow("N02-backslash", "a\\b", "plain file name"),
    NameRow("N03-dotdot", "..", "plain file name"),
    NameRow("N04-dotdot-path", "../evil", "plain file name", cli=False),
    NameRow("N05-absolute-path", "/tmp/evil", "plain file name", cli=False),
    NameRow("N06-windows-absolute-path", "C:\\evil", "plain file name"),
    NameRow("N07-reserved-con", "CON", "reserved on Windows"),
    NameRow("N08-reserved-with-extension", "nul.backup", "reserved on Windows"),
    NameRow("N09-reserved-com-superscript", "COM\u00b9", "reserved on Windows"),
    NameRow("N10-reserved-lpt9", "lpt9", "reserved on Windows"),
    NameRow("N11-121-characters", "x" * 121, "characters long"),
    NameRow("N12-too-many-utf8-bytes", "\u732b" * 70, "bytes long in UTF-8"),
    NameRow("N13-control-character", "a\tb", "has characters"),
    NameRow("N14-colon-ends-the-lora-tag", "a:b", "plain file name"),
    NameRow("N15-greater-than-ends-the-lora-tag", "a>b", "has characters"),
    NameRow("N16-emoji", "cat\U0001f431", "has characters"),
    NameRow("N17-zero-width-space", "a\u200bb", "has characters"),
    NameRow("N18-leading-dot", ".hidden", "must not start or end with a dot"),
    NameRow("N19-empty", "   ", "is empty"),
    NameRow("A01-japanese", "\u732b\u30b9\u30bf\u30a4\u30eb", None, written="\u732b\u30b9\u30bf\u30a4\u30eb"),
    NameRow("A02-decomposed-accent-normalised", "Cafe\u0301", None, written="Caf\u00e9"),
    NameRow(
        "A03-devanagari-combining-marks", "\u092c\u093f\u0932\u094d\u0932\u0940", None, written="\u092c\u093f\u0932\u094d\u0932\u0940"
    ),  # fmt: skip
    NameRow("A04-punctuation", "zip (v2) [sks]+zwx", None, written="zip (v2) [sks]+zwx"),
    NameRow("A05-suffix-given", "named.safetensors", None, written="named"),
    NameRow("A06-long-but-fits", "\u732b" * 66, None, written="\u732b" * 66),
]


@pytest.mark.parametrize("row", NAME_ROWS, ids=[r.id for r in NAME_ROWS])
def test_output_names(world: World, row: NameRow) -> None:
    for face in FACES:
        if face == "cli" and not row.cli:
            continue
        before = snapshot(world)
        method = "zip" if face == "ui" else "direct"  # the tab only zips; elsewhere a direct merge is enough
        outcome = RUNNERS[face](world, "subject", "style", row.name, method=method)
        if row.words is not None:
            outcome.check_line()
            assert row.words in outcome.line, (face, outcome.line)
            if face == "cli":
                assert outcome.code == 2
            if face == "api":
                assert outcome.code == 400  # refused before any job starts
            assert_intact(world, before)
            continue
        assert outcome.ok, (face, outcome.line)
        assert_intact(world, before, written=row.written)
        # written, listed everywhere, and tagged by its own name
        assert row.written in [p.stem for p in world.host.list_loras()]
        assert row.written in world.handlers.choices()
        names = [item["name"] for item in world.client.get(f"{PREFIX}/loras").json()["loras"]]
        assert row.written in names
        assert open_lora(world.folder / f"{row.written}.safetensors").metadata["modelspec.title"]
        remove_output(world, row.written)


def test_N20_existing_output_is_never_overwritten_without_overwrite(world: World) -> None:
    taken = world.folder / "taken.safetensors"
    taken.write_bytes(b"the user's own file")
    for face in FACES:
        before = snapshot(world)
        outcome = RUNNERS[face](world, "subject", "style", "taken", method="direct" if face != "ui" else "zip")
        outcome.check_line()
        assert "already exists" in outcome.line, (face, outcome.line)
        assert_intact(world, before)


def test_N21_output_named_like_an_input_is_refused_even_with_overwrite(world: World) -> None:
    for face in FACES:
        before = snapshot(world)
        kw: dict[str, Any] = {"overwrite": True}
        if face != "ui":
            kw["method"] = "direct"
        outcome = RUNNERS[face](world, "subject", "style", "style", **kw)
        outcome.check_line()
        assert "would overwrite one of its own inputs" in outcome.line, (face, outcome.line)
        assert_intact(world, before)


# ---------------------------------------------------------------------------------------------------------------
# runs: faults while a merge runs (R rows)


@dataclass
class Ctx:
    world: World
    face: str
    monkeypatch: pytest.MonkeyPatch
    between: Between | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)


def _once(predicate: Callable[[Progress], bool], action: Callable[[Progress], None]) -> Callable[[Progress], None]:
    fired = [False]

    def hook(p: Progress) -> None:
        if not fired[0] and predicate(p):
            fired[0] = True
            action(p)

    return hook


def at(stage: str, done: int) -> Callable[[Progress], bool]:
    return lambda p: p.stage.startswith(stage) and p.done >= done


def interrupt_at(stage: str, done: int) -> Callable[[Ctx], None]:
    """The user interrupts at a stage: the CLI gets Ctrl-C there; the core's caller sets the flag; the API's
    interrupt route and the tab's Interrupt button are pressed from the test thread while the job waits there."""

    def install(ctx: Ctx) -> None:
        w = ctx.world
        if ctx.face == "cli":

            def ctrl_c(_: Progress) -> None:
                raise KeyboardInterrupt

            w.hook = _once(at(stage, done), ctrl_c)
        elif ctx.face == "core":
            w.hook = _once(at(stage, done), lambda p: p.interrupt())
        else:
            reached = threading.Event()
            pressed = [False]

            def wait_for_the_user(p: Progress) -> None:
                reached.set()
                deadline = time.monotonic() + 30
                while not p.interrupted() and time.monotonic() < deadline:
                    time.sleep(0.005)

            def press(job_id: str | None) -> None:
                if reached.is_set() and not pressed[0]:
                    pressed[0] = True
                    if job_id is not None:
                        r = w.client.post(f"{PREFIX}/jobs/{job_id}/interrupt")
                        assert r.status_code == 200 and r.json()["interrupt_requested"], r.text
                    else:
                        assert w.handlers.interrupt() == gr.update()  # the polling Zip reports how it ended

            w.hook = _once(at(stage, done), wait_for_the_user)
            ctx.between = press

    return install


def predict_fault(where: str, k: int, error: Callable[[], BaseException]) -> Callable[[Ctx], None]:
    """Raise ``error()`` from the session's predict: at the k-th teacher call (``sampling``), the k-th optimisation
    forward (``step``), or from the k-th step's backward pass (``backward``)."""

    def install(ctx: Ctx) -> None:
        real = ToySession.predict
        calls = [0]

        def predict(self: ToySession, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            grad = torch.is_grad_enabled()
            if (where == "sampling") != grad:
                calls[0] += 1
                if calls[0] == k and where in ("sampling", "step"):
                    raise error()
            out = real(self, x, t, cond)
            if where == "backward" and grad and calls[0] == k:

                def fail(_: torch.Tensor) -> None:
                    raise error()

                out.register_hook(fail)
            return out

        ctx.monkeypatch.setattr(ToySession, "predict", predict)

    return install


def forward_error(k: int) -> Callable[[Ctx], None]:
    """An exception inside the model's own forward (a UNet block), at its k-th call with gradients."""

    def install(ctx: Ctx) -> None:
        calls = [0]

        def pre_hook(module: nn.Module, args: Any) -> None:
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == k:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronous")

        handle = ctx.world.model.unet.middle_block.register_forward_pre_hook(pre_hook)
        ctx.cleanup.append(handle.remove)

    return install


class _Proxy:
    """A module stand-in: the given attributes, everything else from the real module."""

    def __init__(self, real: types.ModuleType, **overrides: Any) -> None:
        self._real = real
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _FillingFile:
    """A file whose disk fills up after ``room`` bytes: the write that does not fit raises ENOSPC."""

    def __init__(self, real: Any, room: int) -> None:
        self._real, self._room = real, room

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._room:
            if self._room:
                self._real.write(memoryview(data).cast("B")[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._real.close()


def disk_fault(where: str, err: int = errno.ENOSPC, nth: int = 1, exc: type[OSError] = OSError) -> Callable[[Ctx], None]:
    """The writer's system calls fail: ``create`` (mkstemp of the nth file: read-only folder, no permission, or
    the disk full when the LoRA's companion is made), ``write`` (disk full after 4 KiB), ``fsync`` (I/O error),
    ``commit`` (the rename into place refused)."""

    def install(ctx: Ctx) -> None:
        count = [0]

        def fail(*_: Any, **__: Any) -> Any:
            raise exc(err, os.strerror(err))

        if where == "create":

            def mkstemp(*a: Any, **k: Any) -> Any:
                count[0] += 1
                if count[0] == nth:
                    fail()
                return tempfile.mkstemp(*a, **k)

            ctx.monkeypatch.setattr(sio, "tempfile", _Proxy(tempfile, mkstemp=mkstemp))
        elif where == "write":
            ctx.monkeypatch.setattr(sio, "os", _Proxy(os, fdopen=lambda *a, **k: _FillingFile(os.fdopen(*a, **k), 4096)))
        elif where == "fsync":
            ctx.monkeypatch.setattr(sio, "os", _Proxy(os, fsync=fail))
        elif where == "commit":
            ctx.monkeypatch.setattr(sio, "os", _Proxy(os, link=fail, replace=fail))
        else:
            raise ValueError(where)

    return install


def output_appears(ctx: Ctx) -> None:
    """Another process writes the same output name while this merge writes it."""

    def write_it(_: Progress) -> None:
        (ctx.world.folder / "out.safetensors").write_bytes(b"another process's file")

    ctx.world.hook = _once(at("Writing", 1), write_it)


def source_removed(ctx: Ctx) -> None:
    """The style LoRA is moved away mid-job (and put back after the row, mtime kept)."""
    src = ctx.world.folder / "style.safetensors"
    away = ctx.world.folder.parent / f"away-{ctx.face}.safetensors"

    def move(_: Progress) -> None:
        os.rename(src, away)

    ctx.world.hook = _once(at("Optimising", 1), move)
    ctx.cleanup.append(lambda: away.exists() and os.rename(away, src))


def thread_killed(ctx: Ctx) -> None:
    """A BaseException (SystemExit) escapes inside the job's thread."""

    def die(_: Progress) -> None:
        raise SystemExit(3)

    ctx.world.hook = _once(at("Optimising", 1), die)


@dataclass(frozen=True)
class RunRow:
    id: str
    install: Callable[[Ctx], None]
    words: str
    cli_code: int = 2
    method: str = "zip"
    faces: tuple[str, ...] = FACES
    cli_words: str | None = None
    extra: dict[str, bytes] | None = None


INTERRUPTED = "nothing was written"
RUN_ROWS = [
    RunRow("R01-interrupt-while-reading-the-loras", interrupt_at("Reading", 1), INTERRUPTED, cli_code=130),
    RunRow("R02-interrupt-while-sampling-the-inputs", interrupt_at("Sampling", 1), INTERRUPTED, cli_code=130),
    RunRow("R03-interrupt-while-optimising", interrupt_at("Optimising", 1), INTERRUPTED, cli_code=130),
    RunRow("R04-interrupt-after-the-last-step", interrupt_at("Optimising", 3), INTERRUPTED, cli_code=130),
    RunRow("R05-interrupt-while-writing", interrupt_at("Writing", 1), INTERRUPTED, cli_code=130),
    RunRow(
        "R06-interrupt-a-direct-merge-while-writing",
        interrupt_at("Writing", 1),
        INTERRUPTED,
        cli_code=130,
        method="direct",
        faces=("core", "cli", "api"),
    ),
    RunRow(
        "R07-out-of-memory-while-sampling",
        predict_fault("sampling", 2, lambda: OOM("CUDA out of memory. Tried to allocate 2.00 GiB")),
        "out of GPU memory",
    ),
    RunRow(
        "R08-out-of-memory-mid-step",
        predict_fault("step", 2, lambda: OOM("CUDA out of memory. Tried to allocate 2.00 GiB")),
        "out of GPU memory",
    ),
    RunRow(
        "R09-out-of-memory-in-backward",
        predict_fault("backward", 2, lambda: OOM("CUDA out of memory. Tried to allocate 2.00 GiB")),
        "out of GPU memory",
    ),
    RunRow("R10-exception-in-the-model-forward", forward_error(2), "internal error: RuntimeError: CUDA error", cli_code=1),
    RunRow(
        "R11-exception-in-predict-while-sampling",
        predict_fault("sampling", 1, lambda: RuntimeError("expected all tensors on one device")),
        "internal error: RuntimeError: expected all tensors",
        cli_code=1,
    ),
    RunRow("R12-disk-full-mid-write", disk_fault("write"), "cannot write out.safetensors in"),
    RunRow("R13-disk-full-on-the-mergers-file", disk_fault("create", nth=2), "cannot write out.ziplora in"),
    RunRow("R14-disk-full-on-the-sidecar", disk_fault("create", nth=3), "cannot write out.json in"),
    RunRow("R15-read-only-folder", disk_fault("create", errno.EROFS), "Read-only file system"),
    RunRow("R16-permission-denied", disk_fault("create", errno.EACCES, exc=PermissionError), "Permission denied"),
    RunRow("R17-io-error-at-fsync", disk_fault("fsync", errno.EIO), "Input/output error"),
    RunRow("R18-rename-into-place-refused", disk_fault("commit", errno.EROFS), "Read-only file system"),
    RunRow("R19-direct-merge-disk-full", disk_fault("write"), "No space left on device", method="direct", faces=("core", "cli", "api")),
    RunRow("R20-output-appears-while-writing", output_appears, "appeared in", extra={"out.safetensors": b"another process's file"}),
    RunRow("R21-source-lora-removed-mid-job", source_removed, "style.safetensors: cannot be read"),
    RunRow("R22-base-exception-in-the-job-thread", thread_killed, "the job stopped unexpectedly", faces=("api", "ui")),
]
_RUN_PARAMS = [
    pytest.param(r, id=r.id, marks=[pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")]
                 if r.install is thread_killed else [])
    for r in RUN_ROWS
]  # fmt: skip


def _run_row(world: World, face: str, row: RunRow, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[Outcome, Ctx]:
    ctx = Ctx(world, face, monkeypatch)
    with monkeypatch.context() as m:
        ctx.monkeypatch = m
        row.install(ctx)
        try:
            extra: dict[str, Any] = {"method": row.method, **kw}
            if face in ("api", "ui") and ctx.between is not None:
                extra["between"] = ctx.between
            outcome = RUNNERS[face](world, "subject", "style", "out", **extra)
        finally:
            world.hook = None
            for undo in ctx.cleanup:
                undo()
    return outcome, ctx


@pytest.mark.parametrize("row", _RUN_PARAMS)
def test_faults_while_running(world: World, row: RunRow, monkeypatch: pytest.MonkeyPatch) -> None:
    for face in (f for f in row.faces if f in FACES):
        before = snapshot(world)
        outcome, _ = _run_row(world, face, row, monkeypatch, gradient_checkpointing=True) if face in ("core", "api", "ui") \
            else _run_row(world, face, row, monkeypatch)  # fmt: skip
        outcome.check_line()
        words = row.cli_words if face == "cli" and row.cli_words else row.words
        if face == "cli" and row.cli_code == 130:
            assert outcome.line == "interrupted; nothing was written", outcome.line
        else:
            assert words in outcome.line, (face, outcome.line)
        if face == "cli":
            assert outcome.code == row.cli_code, outcome
        if face == "api":
            assert outcome.state == ("interrupted" if row.cli_code == 130 else "failed"), outcome
        assert_intact(world, before, extra=row.extra)
        for name in row.extra or {}:
            (world.folder / name).unlink()


# -- overwriting: a failure leaves the previous output, its sidecar and its mergers exactly as they were --------


@pytest.mark.parametrize("nth", [1, 2, 3], ids=["R23-disk-full-overwriting-the-lora", "R24-disk-full-overwriting-the-mergers",
                                                "R25-disk-full-overwriting-the-sidecar"])  # fmt: skip
def test_a_failed_overwrite_keeps_the_previous_output(world: World, nth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_core(world, "subject", "style", "out").ok  # the previous output: LoRA, sidecar and mergers
    assert {p.name for p in world.folder.iterdir()} >= {"out.safetensors", "out.json", "out.ziplora"}
    row = RunRow("overwrite", disk_fault("create", nth=nth), "cannot write out.")
    for face in FACES:
        before = snapshot(world)
        outcome, _ = _run_row(world, face, row, monkeypatch, overwrite=True)
        outcome.check_line()
        assert "cannot write out." in outcome.line and "No space left on device" in outcome.line, (face, outcome.line)
        assert_intact(world, before)


def test_R26_a_direct_merge_over_a_zip_output_drops_its_stale_mergers(world: World) -> None:
    assert run_core(world, "subject", "style", "out").ok
    assert (world.folder / "out.ziplora").is_file()
    assert run_core(world, "subject", "style", "out", method="direct", overwrite=True).ok
    assert not (world.folder / "out.ziplora").exists()  # they described the old file, not this one
    assert_model_clean(world.model)


# -- the same faults on a re-export ("Write again with this style multiplier") -----------------------------------


@pytest.mark.parametrize("nth", [1, 2], ids=["R27-disk-full-rewriting-the-lora", "R28-disk-full-rewriting-its-mergers"])
def test_a_failed_reexport_keeps_the_merge(world: World, nth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_core(world, "subject", "style", "zipped").ok
    out = world.folder / "zipped.safetensors"
    faces: dict[str, Callable[[], Outcome]] = {}

    def core() -> Outcome:
        try:
            reexport(world.host, out, 0.5)
        except ZipLoraError as err:
            return Outcome("core", False, str(err))
        return Outcome("core", True)

    def cli_face() -> Outcome:
        code = cli.main(["reexport", str(out), "--style-multiplier", "0.5"])
        err = world.capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return Outcome("cli", False, err.strip(), code=code)

    def api_face() -> Outcome:
        r = world.client.post(f"{PREFIX}/reexport", json={"name": "zipped", "style_multiplier": 0.5})
        assert r.status_code == 500 and set(r.json()) == {"error"}, r.text
        return Outcome("api", False, r.json()["error"], code=500)

    def ui_face() -> Outcome:
        kind, text = _status(world.handlers.reexport({"file": str(out)}, 0.5))
        return Outcome("ui", kind == "ok", text)

    faces = {"core": core, "cli": cli_face, "api": api_face, "ui": ui_face}
    for face, call in faces.items():
        before = snapshot(world)
        with monkeypatch.context() as m:
            disk_fault("create", nth=nth)(Ctx(world, face, m))
            outcome = call()
        outcome.check_line()
        assert "No space left on device" in outcome.line and "nothing was written" in outcome.line, (face, outcome.line)
        assert_intact(world, before)
    assert (world.folder / "zipped.ziplora").is_file() and out.is_file()


# -- a second merge while one runs: refused, never interleaved ------------------------------------------------------


@needs_gradio
def test_R29_a_second_merge_while_one_runs_is_refused(world: World) -> None:
    before = snapshot(world)
    reached, release = threading.Event(), threading.Event()

    def hold(_: Progress) -> None:
        reached.set()
        release.wait(60)

    world.hook = _once(at("Optimising", 1), hold)
    first = world.client.post(f"{PREFIX}/merge", json={"content": "subject", "style": "style", "output_name": "first", **FAST})
    assert first.status_code == 202
    assert reached.wait(60)
    try:
        stages: list[str] = []
        # the API: 409 at once
        r = world.client.post(f"{PREFIX}/merge", json={"content": "subject", "style": "style", "output_name": "second", **FAST})
        assert r.status_code == 409 and set(r.json()) == {"error"} and "is running" in r.json()["error"], r.text
        # the tab: one line, no job
        ui_outcome = run_ui(world, "subject", "style", "second")
        ui_outcome.check_line()
        assert "is running" in ui_outcome.line
        # the core and the CLI on the same model: the model's lock refuses them
        for face in ("core", "cli"):
            outcome = RUNNERS[face](world, "subject", "style", "second")
            outcome.check_line()
            assert "another merge is running on this model" in outcome.line, (face, outcome.line)
            stages.append(face)
        # the re-export route waits for no one either
        r = world.client.post(f"{PREFIX}/reexport", json={"name": "subject", "style_multiplier": 0.5})
        assert r.status_code == 409, r.text
    finally:
        release.set()
        world.hook = None
    data = _poll(world, first.json()["job_id"], None)
    assert data["state"] == "done", data["error"]
    assert len(data["losses"]) == 3  # the first job ran all its steps, alone
    assert_intact(world, before, written="first")


# -- fp16 overflow: NaN in the loss -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overflow", "teachers", "fp32", "ok", "words"),
    [
        ({"fp16": 1e6}, False, True, True, "retried in fp32"),
        ({"fp16": 1e6}, True, True, True, "retried in fp32"),
        ({"fp16": 1e6, "fp32": float("nan")}, False, True, False, "stopped cleanly, nothing was written"),
        ({"fp16": 1e6}, False, False, False, "a retry in fp32 is not possible here"),
    ],
    ids=["R30-fp16-overflow-mid-optimisation-retried-in-fp32", "R31-fp16-overflow-in-the-teachers-retried-in-fp32",
         "R32-nan-in-fp32-too-stopped-cleanly", "R33-fp16-overflow-where-fp32-is-unavailable"],
)  # fmt: skip
def test_non_finite_loss(tmp_path: Path, untrained_model, monkeypatch: pytest.MonkeyPatch, capsys,  # type: ignore[no-untyped-def]
                         overflow: dict[str, float], teachers: bool, fp32: bool, ok: bool, words: str) -> None:  # fmt: skip
    world = _make_world(tmp_path, untrained_model, monkeypatch, capsys,
                        lambda folder: HalfToyHost(folder, untrained_model, overflow, teachers=teachers, fp32=fp32))  # fmt: skip
    for face in FACES:
        before = snapshot(world)
        outcome = RUNNERS[face](world, "subject", "style", "out")
        if ok:
            assert outcome.ok, (face, outcome.line)
            assert any(words in n and "float16 overflow" in n for n in outcome.notes), (face, outcome.notes)
            if face == "api":
                assert outcome.losses == 3  # the plot shows the fp32 run, not the one that overflowed
            assert_intact(world, before, written="out")
            remove_output(world, "out")
        else:
            outcome.check_line()
            assert words in outcome.line and "the loss became" in outcome.line, (face, outcome.line)
            if face == "cli":
                assert outcome.code == 2
            assert_intact(world, before)


# ---------------------------------------------------------------------------------------------------------------
# the API's own bad inputs (P rows)


def _auth_world(world: World) -> TestClient:
    app = FastAPI()
    mount(app, world.service, "alice:s3cret")
    return TestClient(app)


API_ROWS = [
    ("P01-malformed-json", "post", "/merge", b"{not json", 400, "not valid JSON"),
    ("P02-body-not-an-object", "post", "/merge", b"[1, 2]", 400, "must be a JSON object"),
    ("P03-empty-body", "post", "/merge", b"", 400, "must be a JSON object"),
    ("P04-json-nested-100000-deep", "post", "/merge", b"[" * 100_000, 400, "nested too deeply"),
    ("P05-invalid-utf8", "post", "/merge", b'{"content": "\xff\xfe"}', 400, "not valid JSON"),
    (
        "P06-unknown-option",
        "post",
        "/merge",
        {"content": "subject", "style": "style", "output_name": "o", "stpes": 3},
        400,
        "unknown option 'stpes'",
    ),
    ("P07-missing-field", "post", "/merge", {"content": "subject", "output_name": "o"}, 400, "missing 'style'"),
    (
        "P08-wrong-type",
        "post",
        "/merge",
        {"content": "subject", "style": "style", "output_name": "o", "steps": "3"},
        400,
        "steps must be a whole number",
    ),
    (
        "P09-nan-number",
        "post",
        "/merge",
        b'{"content": "subject", "style": "style", "output_name": "o", "style_multiplier": NaN}',
        400,
        "style multiplier must be between",
    ),
    (
        "P10-infinite-number",
        "post",
        "/merge",
        b'{"content": "subject", "style": "style", "output_name": "o", "lam": 1e999}',
        400,
        "lambda must be between",
    ),
    (
        "P11-boolean-as-text",
        "post",
        "/merge",
        {"content": "subject", "style": "style", "output_name": "o", "overwrite": "yes"},
        400,
        "true or false",
    ),
    ("P12-unknown-lora-name", "post", "/merge", {"content": "nobody", "style": "style", "output_name": "o"}, 404, "no LoRA named 'nobody'"),
    ("P13-path-like-name-dotdot", "post", "/merge", {"content": "../subject", "style": "style", "output_name": "o"}, 400, "not a path"),
    ("P14-path-like-name-absolute", "post", "/merge", {"content": "/etc/passwd", "style": "style", "output_name": "o"}, 400, "not a path"),
    ("P15-path-like-name-subfolder", "post", "/merge", {"content": "subject", "style": "sub/style", "output_name": "o"}, 400, "not a path"),
    (
        "P16-path-like-name-windows",
        "post",
        "/merge",
        {"content": "C:\\loras\\subject", "style": "style", "output_name": "o"},
        400,
        "not a path",
    ),
    ("P17-path-like-name-home", "post", "/merge", {"content": "~/subject", "style": "style", "output_name": "o"}, 400, "not a path"),
    (
        "P18-path-like-output-name",
        "post",
        "/merge",
        {"content": "subject", "style": "style", "output_name": "../../evil"},
        400,
        "plain file name",
    ),
    ("P19-unknown-job", "get", "/jobs/nope", None, 404, "no job 'nope'"),
    ("P20-interrupt-unknown-job", "post", "/jobs/nope/interrupt", None, 404, "no job 'nope'"),
    ("P21-reexport-path-like-name", "post", "/reexport", {"name": "../subject", "style_multiplier": 0.5}, 400, "not a path"),
    ("P22-reexport-unknown-name", "post", "/reexport", {"name": "nobody", "style_multiplier": 0.5}, 404, "no LoRA named 'nobody'"),
    ("P23-reexport-not-a-zip-output", "post", "/reexport", {"name": "subject", "style_multiplier": 0.5}, 400, "has no saved mergers"),
    ("P24-reexport-bad-multiplier", "post", "/reexport", {"name": "subject", "style_multiplier": "lots"}, 400, "must be a number"),
    ("P25-reexport-missing-field", "post", "/reexport", {"name": "subject"}, 400, "name and style_multiplier"),
]


@pytest.mark.parametrize(("row_id", "method", "path", "body", "status", "words"), API_ROWS, ids=[r[0] for r in API_ROWS])
def test_api_bad_requests(world: World, row_id: str, method: str, path: str, body: Any, status: int, words: str) -> None:
    before = snapshot(world)
    kw: dict[str, Any] = {}
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {"content-type": "application/json"}}
    elif body is not None:
        kw = {"json": body}
    r = getattr(world.client, method)(f"{PREFIX}{path}", **kw)
    assert r.status_code == status, (r.status_code, r.text)
    data = r.json()
    assert set(data) == {"error"} and "\n" not in data["error"] and words in data["error"], data
    assert_intact(world, before)


@pytest.mark.parametrize(
    ("row_id", "auth", "headers"),
    [("P26-missing-credentials", None, {}), ("P27-wrong-password", ("alice", "guess"), {}),
     ("P28-unknown-user", ("mallory", "s3cret"), {}), ("P29-malformed-authorization-header", None, {"Authorization": "Basic %%%"}),
     ("P30-other-auth-scheme", None, {"Authorization": "Bearer s3cret"})],
    ids=["P26-missing-credentials", "P27-wrong-password", "P28-unknown-user", "P29-malformed-authorization-header",
         "P30-other-auth-scheme"],
)  # fmt: skip
def test_api_credentials_when_auth_is_set(world: World, row_id: str, auth: Any, headers: dict[str, str]) -> None:
    client = _auth_world(world)
    before = snapshot(world)
    good = {"content": "subject", "style": "style", "output_name": "o", **FAST}
    for method, path, body in (("post", "/merge", good), ("get", "/jobs/x", None), ("post", "/jobs/x/interrupt", None),
                               ("post", "/reexport", {"name": "subject", "style_multiplier": 0.5}), ("get", "/loras", None)):  # fmt: skip
        kw: dict[str, Any] = {"auth": auth, "headers": headers}
        if body is not None:
            kw["json"] = body
        r = getattr(client, method)(f"{PREFIX}{path}", **kw)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic", (path, r.status_code)
        assert set(r.json()) == {"error"} and "\n" not in r.json()["error"]
    assert client.get(f"{PREFIX}/loras", auth=("alice", "s3cret")).status_code == 200
    assert_intact(world, before)


@needs_gradio
def test_ui_refuses_what_the_pickers_cannot_offer(world: World) -> None:
    """The tab's own bad inputs: nothing picked, a label whose file vanished, cleared numbers."""
    before = snapshot(world)
    for kw, words in (
        ({"subject": None}, "pick a subject LoRA"),
        ({"style": "../style"}, "no such LoRA"),
        ({"steps": None}, "steps is empty"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"target_rank": float("nan")}, "target rank must be a whole number"),
        ({"inputs": "Reference images"}, "give 1 to 10 subject reference images"),
    ):
        values = dict(zip(ui.ZIP_FIELDS, ui_values("subject", "style", "o"), strict=True))
        values.update(kw)
        items = list(world.handlers.zip(*[values[f] for f in ui.ZIP_FIELDS]))
        assert len(items) == 1
        kind, text = _status(items[0][0])
        assert kind == "error" and words in text and "\n" not in text, (kw, text)
    kind, text = _status(world.handlers.reexport({}, 0.5))
    assert kind == "error" and "zip two LoRAs first" in text
    kind, text = _status(world.handlers.reexport({"file": str(world.folder / "subject.safetensors")}, 0.5))
    assert kind == "error" and "has no saved mergers" in text
    assert_intact(world, before)


# ---------------------------------------------------------------------------------------------------------------
# host-specific faults on the A1111 and Forge stand-ins (H rows)


def full_hash(module: nn.Module) -> dict[str, bytes]:
    """``state_hash`` that also takes 0-dim tensors (Forge's models hold some)."""
    return {k: v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in module.state_dict().items()}


def _te(component: str) -> list[LayerKey]:
    return [LayerKey(component, f"text_model.encoder.layers.0.{p}") for p in ("self_attn.q_proj", "mlp.fc1")]


@pytest.fixture()
def a1111(tmp_path: Path, untrained_model):  # type: ignore[no-untyped-def]
    import copy

    from tests.standins.a1111 import build_world, installed

    folder = tmp_path / "Lora"
    folder.mkdir()
    keys = _keys() + _te("te1") + _te("te2")
    write_random_lora(folder / "subject.safetensors", keys, Family.TOYXL, rank=4, seed=1, scale=0.3)
    write_random_lora(folder / "style.safetensors", keys, Family.TOYXL, rank=4, seed=2, scale=0.3)
    w = build_world(copy.deepcopy(untrained_model), folder)
    with installed(w):
        yield w


@pytest.fixture()
def forge(tmp_path: Path):  # type: ignore[no-untyped-def]
    from tests.standins import forge as standins

    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    keys = _keys() + _te("te1") + _te("te2")
    write_random_lora(folder / "subject.safetensors", keys, Family.TOYXL, rank=4, seed=1, scale=0.3)
    write_random_lora(folder / "style.safetensors", keys, Family.TOYXL, rank=4, seed=2, scale=0.3)
    world = standins.install(folder)
    try:
        yield world
    finally:
        standins.uninstall()


@dataclass
class WebUI:
    """What the H rows need of a stand-in: the host, its model, the Interrupt button, and its own clean check."""

    name: str
    host: Any
    model: nn.Module
    unet: nn.Module
    folder: Path
    interrupt: Callable[[], None]
    clean: Callable[[], None]
    session_cls: type


def _webui(kind: str, request: pytest.FixtureRequest) -> WebUI:
    if kind == "a1111":
        from tests.test_host_a1111 import ToyA1111Host, _no_leftovers
        from ziplora.hosts.a1111 import A1111Session

        w = request.getfixturevalue("a1111")
        return WebUI("a1111", ToyA1111Host(), w.sd_model, w.sd_model.model.diffusion_model, w.lora_dir,
                     w.shared.state.interrupt, lambda: _no_leftovers(w), A1111Session)  # fmt: skip
    from tests.test_host_forge import _assert_clean, _models
    from ziplora.hosts.forge import ForgeHost, ForgeSession

    w = request.getfixturevalue("forge")
    w.generate("a shape")  # Forge loads its model at the first generation
    unet, clip = _models(w)
    both = nn.ModuleDict({"unet": unet, "clip": clip})
    host = ForgeHost(families=(Family.TOYXL,), default_resolution=32, preview_steps=3)
    return WebUI("forge", host, both, unet.diffusion_model, w.lora_dir, w.state.interrupt, lambda: _assert_clean(w), ForgeSession)


def _webui_fault(kind: str, ui_: WebUI, progress: Progress, m: pytest.MonkeyPatch) -> Callable[[], None]:
    """Install one H-row fault; returns its undo."""
    undo: Callable[[], None] = lambda: None  # noqa: E731
    if kind.startswith("interrupt:"):
        stage = kind.split(":", 1)[1]
        progress.add_listener(_once(at(stage, 1), lambda _: ui_.interrupt()))
    elif kind == "forward":
        calls = [0]

        def pre_hook(module: nn.Module, args: Any) -> None:
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == 2:
                    raise RuntimeError("CUDA error: device-side assert triggered")

        undo = ui_.unet.middle_block.register_forward_pre_hook(pre_hook).remove
    elif kind in ("oom", "oom-backward"):
        real = ui_.session_cls.predict
        calls = [0]

        def predict(self: Any, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == 2 and kind == "oom":
                    raise OOM("CUDA out of memory. Tried to allocate 20.00 MiB")
            out = real(self, x, t, cond)
            if kind == "oom-backward" and torch.is_grad_enabled() and calls[0] == 2:

                def fail(_: torch.Tensor) -> None:
                    raise OOM("CUDA out of memory in backward")

                out.register_hook(fail)
            return out

        m.setattr(ui_.session_cls, "predict", predict)
    elif kind == "disk":
        m.setattr(sio, "os", _Proxy(os, fdopen=lambda *a, **k: _FillingFile(os.fdopen(*a, **k), 4096)))
    else:
        raise ValueError(kind)
    return undo


H_ROWS = [
    ("H01-exception-in-the-webui-forward", "forward", "failed", "internal error: RuntimeError: CUDA error"),
    ("H02-out-of-memory-mid-step", "oom", "failed", "out of GPU memory"),
    ("H03-out-of-memory-in-backward", "oom-backward", "failed", "out of GPU memory"),
    ("H04-webui-interrupt-while-sampling", "interrupt:Sampling", "interrupted", "nothing was written"),
    ("H05-webui-interrupt-while-optimising", "interrupt:Optimising", "interrupted", "nothing was written"),
    ("H06-webui-interrupt-while-writing", "interrupt:Writing", "interrupted", "nothing was written"),
    ("H07-disk-full-while-writing", "disk", "failed", "No space left on device"),
]


@pytest.mark.parametrize("webui", ["a1111", "forge"])
@pytest.mark.parametrize(("row_id", "kind", "state", "words"), H_ROWS, ids=[r[0] for r in H_ROWS])
def test_webui_faults(request: pytest.FixtureRequest, webui: str, row_id: str, kind: str, state: str, words: str,
                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    w = _webui(webui, request)
    before, files = full_hash(w.model), listing(w.folder)
    flags = [p.requires_grad for p in w.model.parameters()]
    progress = Progress()
    with monkeypatch.context() as m:
        undo = _webui_fault(kind, w, progress, m)
        try:
            service = MergeService(w.host)
            status = service.wait(service.submit_merge(MergeRequest("subject", "style", "out", gradient_checkpointing=True, **FAST),
                                                       progress), 300)  # fmt: skip
        finally:
            undo()
    assert status.state == state and words in status.error and "\n" not in status.error, (status.state, status.error)
    assert full_hash(w.model) == before and [p.requires_grad for p in w.model.parameters()] == flags
    assert_model_clean(w.model)
    w.clean()  # the stand-in's own checks: queue lock, shared.state, hooks, borrowed attributes
    now = listing(w.folder)
    assert now == files, sorted(set(now) ^ set(files))


@pytest.mark.parametrize("webui", ["a1111", "forge"])
def test_H08_a_second_merge_from_elsewhere_is_queued_behind_the_first(request: pytest.FixtureRequest, webui: str) -> None:
    """Two services on one WebUI (say, two extensions' API clients): the WebUI's queue lock makes the second wait
    until the first has finished; their stages never interleave."""
    w = _webui(webui, request)
    before = full_hash(w.model)
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def recorder(tag: str) -> Progress:
        p = Progress()

        def listen(q: Progress) -> None:
            with lock:
                if not events or events[-1] != (tag, q.stage):
                    events.append((tag, q.stage))

        p.add_listener(listen)
        return p

    first, second = MergeService(w.host), MergeService(w.host)
    j1 = first.submit_merge(MergeRequest("subject", "style", "one", **FAST), recorder("one"))
    while not events:
        time.sleep(0.005)
    j2 = second.submit_merge(MergeRequest("subject", "style", "two", **FAST), recorder("two"))
    s1, s2 = first.wait(j1, 300), second.wait(j2, 300)
    assert s1.state == "done" and s2.state == "done", (s1.error, s2.error)
    order = [tag for tag, stage in events if not stage.startswith("Waiting")]
    assert order == sorted(order, key=lambda t: t != "one"), events  # all of "one", then all of "two"
    assert full_hash(w.model) == before
    assert_model_clean(w.model)
    w.clean()
