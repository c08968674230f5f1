"""The output file's name: a plain file name that no file system, shell or ``<lora:NAME:1>`` prompt chokes on."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from ziplora.errors import InvalidRequestError

__all__ = ["check_output_name", "MAX_NAME_LENGTH", "MAX_NAME_BYTES"]

_WINDOWS_RESERVED = {
    "CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
    *(f"{port}{i}" for port in ("COM", "LPT") for i in (*range(1, 10), "\u00b9", "\u00b2", "\u00b3")),
}  # fmt: skip
_PUNCTUATION = set("-_. ()+[]")
MAX_NAME_LENGTH = 120
# file systems count bytes (255 on ext4, APFS, NTFS in UTF-16 units): the name, ".safetensors" and the temporary
# name's ".<name>.safetensors.XXXXXXXX.tmp" must all fit, in any script (a CJK character is 3 bytes in UTF-8)
MAX_NAME_BYTES = 200


def check_output_name(name: str) -> str:
    """The output file's stem: no folders, nothing the prompt syntax or a file system would choke on."""
    if not isinstance(name, str):
        raise InvalidRequestError("the output name must be text")
    name = unicodedata.normalize("NFC", name.strip())
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name:
        raise InvalidRequestError("the output name is empty")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name or Path(name).is_absolute() or ":" in name:
        raise InvalidRequestError(f"output name {name!r} must be a plain file name, without folders, '..' or ':'")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequestError(f"output name is {len(name)} characters long; keep it under {MAX_NAME_LENGTH}")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidRequestError(
            f"output name is {len(name.encode('utf-8'))} bytes long in UTF-8, too long for a file name; keep it under {MAX_NAME_BYTES}"
        )
    if not all(_name_character(c) for c in name):
        raise InvalidRequestError(
            f"output name {name!r} has characters that break files or <lora:NAME:1> prompts; "
            "use letters, digits, spaces, '-', '_', '.', '(', ')', '+'"
        )
    if name.startswith(".") or name.endswith("."):
        raise InvalidRequestError(f"output name {name!r} must not start or end with a dot")
    if name.split(".")[0].upper().strip() in _WINDOWS_RESERVED:
        raise InvalidRequestError(f"output name {name!r} is reserved on Windows")
    return name


def _name_character(c: str) -> bool:
    """Letters, combining marks and digits of any script (Devanagari and Thai need the marks), and -_.()+[] and
    space: nothing a file system, a shell or A1111's ``<lora:NAME:1>`` (which ends at ':' and '>') chokes on."""
    return c in _PUNCTUATION or unicodedata.category(c)[0] in ("L", "M", "N")
