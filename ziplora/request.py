"""One validated, frozen merge request: the tab, the CLI and the API route only build this."""

from __future__ import annotations

import math
import unicodedata
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ziplora.errors import InvalidRequestError
from ziplora.merge.loss import REDUCTIONS, SIMILARITIES

__all__ = ["MergeRequest", "check_output_name", "check_number", "METHODS", "PRECISIONS", "FORMS", "INPUT_KINDS"]

METHODS = ("zip", "direct")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
FORMS = ("auto", "fused", "side")
INPUT_KINDS = ("data-free", "images")

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


def check_number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> None:
    """A finite number in [lo, hi] (a whole one if ``integer``), else a one-line ``InvalidRequestError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        kind = "a whole number" if integer else "a number"
        raise InvalidRequestError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidRequestError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}")


@dataclass(frozen=True)
class MergeRequest:
    """Everything a merge needs. ``content`` / ``style`` are LoRA names (in the host's folder) or paths."""

    content: str
    style: str
    output_name: str
    method: str = "zip"
    content_prompt: str = ""  # empty: made from the LoRA's trigger words
    style_prompt: str = ""
    style_multiplier: float = 1.0
    content_weight: float = 1.0
    target_rank: int | None = None
    overwrite: bool = False
    steps: int = 100
    lam: float = 0.01
    lr: float = 0.01
    similarity: str = "dot"
    reduction: str = "sum"
    stop_similarity: float = 0.01
    resolution: int | None = None  # None: the host's default (1024 on SDXL)
    samples: int = 2
    sampling_steps: int = 20
    guidance: float | None = None
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    form: str = "auto"
    inputs: str = "data-free"
    content_images: tuple[str, ...] = field(default_factory=tuple)
    style_images: tuple[str, ...] = field(default_factory=tuple)
    merge_text_encoders: bool = True

    def validated(self) -> MergeRequest:
        """A checked copy (the output name normalised); raises ``InvalidRequestError`` with one line."""
        for name in ("content", "style"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidRequestError(f"pick a {'subject' if name == 'content' else 'style'} LoRA")
        if self.method not in METHODS:
            raise InvalidRequestError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for prompt in ("content_prompt", "style_prompt"):
            if not isinstance(getattr(self, prompt), str) or len(getattr(self, prompt)) > 1000:
                raise InvalidRequestError(f"{prompt} must be text under 1000 characters")
        check_number("style multiplier", self.style_multiplier, 0.0, 1.5)
        check_number("content weight", self.content_weight, 0.0, 2.0)
        if self.target_rank is not None:
            check_number("target rank", self.target_rank, 1, 4096, integer=True)
        check_number("steps", self.steps, 1, 1000, integer=True)
        check_number("lambda", self.lam, 0.0, 100.0)
        check_number("learning rate", self.lr, 1e-8, 1.0)
        check_number("similarity stop threshold", self.stop_similarity, 0.0, 1.0)
        if self.resolution is not None:
            check_number("resolution", self.resolution, 16, 4096, integer=True)
            if self.resolution % 8:
                raise InvalidRequestError(f"resolution must be a multiple of 8, got {self.resolution}")
        check_number("samples per concept", self.samples, 1, 64, integer=True)
        check_number("sampling steps", self.sampling_steps, 1, 200, integer=True)
        if self.guidance is not None:
            check_number("guidance", self.guidance, 0.0, 30.0)
        check_number("seed", self.seed, 0, 2**63 - 1, integer=True)
        if self.similarity not in SIMILARITIES:
            raise InvalidRequestError(f"similarity must be one of {', '.join(SIMILARITIES)}")
        if self.reduction not in REDUCTIONS:
            raise InvalidRequestError(f"reduction must be one of {', '.join(REDUCTIONS)}")
        if self.precision not in PRECISIONS:
            raise InvalidRequestError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.form not in FORMS:
            raise InvalidRequestError(f"form must be one of {', '.join(FORMS)}")
        if self.inputs not in INPUT_KINDS:
            raise InvalidRequestError(f"inputs must be one of {', '.join(INPUT_KINDS)}")
        if self.inputs == "images":
            if not 1 <= len(self.content_images) <= 10:
                raise InvalidRequestError("give 1 to 10 subject reference images")
            if len(self.style_images) != 1:
                raise InvalidRequestError("give exactly 1 style reference image")
        return replace(
            self,
            output_name=check_output_name(self.output_name),
            steps=int(self.steps),
            samples=int(self.samples),
            sampling_steps=int(self.sampling_steps),
            seed=int(self.seed),
            target_rank=None if self.target_rank is None else int(self.target_rank),
            resolution=None if self.resolution is None else int(self.resolution),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> MergeRequest:
        """From JSON (the API): unknown keys are an error, not silently dropped."""
        if not isinstance(data, dict):
            raise InvalidRequestError("the request must be a JSON object")
        known = {f.name for f in fields(MergeRequest)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequestError(f"unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        missing = [k for k in ("content", "style", "output_name") if k not in data]
        if missing:
            raise InvalidRequestError(f"missing {missing[0]!r}")
        values = dict(data)
        for key in ("content_images", "style_images"):
            if key in values:
                if not isinstance(values[key], (list, tuple)) or not all(isinstance(v, str) for v in values[key]):
                    raise InvalidRequestError(f"{key} must be a list of file paths")
                values[key] = tuple(values[key])
        for key in ("overwrite", "gradient_checkpointing", "merge_text_encoders"):
            if key in values and not isinstance(values[key], bool):
                raise InvalidRequestError(f"{key} must be true or false")
        return MergeRequest(**values).validated()
