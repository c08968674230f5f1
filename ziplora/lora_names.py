"""LoRA names: the one name each file in the host's folders is offered under, and the file a name selects.

A LoRA is named by its file stem, as A1111 and Forge name it in ``<lora:NAME:1>`` and on its card
(``extensions-builtin/Lora/networks.py`` ``process_network_files``: the stem without the folder). The WebUIs let a
second file with the same stem in another subfolder silently win; here a stem shared by several files selects none
of them: each is offered under its path below the LoRA folder without ``.safetensors`` (``sub/name``, and
``./name`` for the one at the top), the folder path that the WebUI's Lora tree view and card search show.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath

from ziplora.errors import InvalidRequestError, LoraFormatError
from ziplora.hosts.base import Host

__all__ = ["lora_names", "resolve_lora", "AmbiguousLoraName"]

SUFFIX = ".safetensors"


class AmbiguousLoraName(InvalidRequestError):
    """A stem that several files share: the message names each of them by its folder."""


def _below(path: Path, root: Path) -> str | None:
    """``sub/name`` for a file below ``root`` (no suffix), else None (a second folder, e.g. A1111's LyCORIS one)."""
    try:
        return path.relative_to(root).with_suffix("").as_posix()
    except ValueError:
        return None


def _qualified(path: Path, root: Path) -> str:
    below = _below(path, root)
    if below is None:
        return path.with_suffix("").as_posix()
    return below if "/" in below else f"./{below}"


def lora_names(host: Host) -> dict[str, Path]:
    """Name -> file for every LoRA the host lists, in its order: the stem where it is unique, else the qualified name."""
    files = host.list_loras()
    root = Path(host.lora_dir())
    stems = Counter(p.stem for p in files)
    out: dict[str, Path] = {}
    for path in files:
        out.setdefault(path.stem if stems[path.stem] == 1 else _qualified(path, root), path)
    return out


def resolve_lora(host: Host, name_or_path: str, *, paths: bool = True) -> Path:
    """The one file ``name_or_path`` selects: an offered name, a stem (with or without ``.safetensors``) that one
    file has, a path below the LoRA folder (``sub/name``), or, where ``paths`` (the CLI and the tab, never the
    API), a file anywhere. A stem that several files share is an :class:`AmbiguousLoraName` naming them all."""
    names = lora_names(host)
    if name_or_path in names:
        return names[name_or_path]
    root = Path(host.lora_dir())
    bare = name_or_path[: -len(SUFFIX)] if name_or_path.endswith(SUFFIX) else name_or_path
    if bare in names:
        return names[bare]
    if Path(name_or_path).is_absolute() or "/" in bare:
        wanted = PurePosixPath(bare).as_posix()
        for path in names.values():
            if _below(path, root) == wanted:
                return path
        if not paths:
            raise InvalidRequestError(f"no LoRA named {name_or_path!r} in {root}")
        if Path(name_or_path).is_file():
            return Path(name_or_path)
        raise LoraFormatError(f"{name_or_path}: no such file")
    shared = [name for name, path in names.items() if path.stem == bare]
    if shared:
        raise AmbiguousLoraName(f"{len(shared)} LoRAs in {root} are named {bare!r}: {', '.join(shared)}; pick one by its folder")
    raise InvalidRequestError(f"no LoRA named {bare!r} in {root}")
