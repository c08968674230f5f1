"""The requests, each field declared once: what the tab, the CLI and the API build, and the only thing they build.

One line per field (see ``ziplora.request.options``): the type, the default, the bounds or choices, the one-line
help and the faces that show it. A new field declared here is a CLI flag, an API key and a tab control (in the
Advanced section unless the tab's layout places it) with the same name, default and error message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ziplora.errors import InvalidRequestError
from ziplora.merge.loss import REDUCTIONS, SIMILARITIES
from ziplora.request.options import REQUIRED, from_json, option, reuse, validate
from ziplora.request.output_name import check_output_name

__all__ = ["MergeRequest", "ReexportRequest", "METHODS", "PRECISIONS", "FORMS", "INPUT_KINDS"]

METHODS = ("zip", "direct")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
FORMS = ("auto", "fused", "side")
INPUT_KINDS = ("data-free", "images")


def _picked(what: str) -> Any:
    def check(value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequestError(f"pick a {what}")
        return value

    return check


@dataclass(frozen=True)
class MergeRequest:
    """Everything a merge needs. ``content`` / ``style`` are LoRA names (in the host's folder) or paths."""

    content: str = option(
        REQUIRED, "subject LoRA", "a name from the LoRA folder (on the command line, a file)", check=_picked("subject LoRA")
    )
    style: str = option(REQUIRED, "style LoRA", "a name from the LoRA folder (on the command line, a file)", check=_picked("style LoRA"))
    output_name: str = option(
        REQUIRED, "output name", "the merged LoRA's file name", check=check_output_name, faces=("api", "tab")
    )  # CLI: --out
    method: str = option("zip", "method", "zip: ZipLoRA; direct: the plain sum of the two LoRAs", choices=METHODS, faces=("cli", "api"))
    content_prompt: str = option("", "subject prompt", "what the subject LoRA renders to teach (empty: its trigger words)", max_length=1000)
    style_prompt: str = option("", "style prompt", "what the style LoRA renders to teach (empty: its trigger words)", max_length=1000)
    style_multiplier: float = option(1.0, "style multiplier", "how strongly the style is written into the merged LoRA", lo=0.0, hi=1.5)
    content_weight: float = option(1.0, "content weight", "how strongly the subject is written into the merged LoRA", lo=0.0, hi=2.0)
    target_rank: int | None = option(
        None, "target rank", "one rank for every layer, by SVD (unset: exact)", lo=1, hi=4096, aliases=("--rank",)
    )
    overwrite: bool = option(False, "overwrite", "replace a file of the same name")
    steps: int = option(100, "steps", "optimisation steps at most (it stops early once the similarity is low)", lo=1, hi=1000)
    lam: float = option(0.01, "lambda", "λ, the weight of the similarity term in the loss", lo=0.0, hi=100.0)
    lr: float = option(0.01, "learning rate", "the learning rate of the mergers", lo=1e-8, hi=1.0)
    similarity: str = option("dot", "similarity", "the similarity term: dot (the paper's) or cos", choices=SIMILARITIES)
    reduction: str = option("sum", "reduction", "how the layers' similarity terms add up: sum (the paper's) or mean", choices=REDUCTIONS)
    stop_similarity: float = option(0.01, "similarity stop threshold", "stop once the mean similarity term is below this", lo=0.0, hi=1.0)
    resolution: int | None = option(None, "resolution", "image size of the inputs (unset: the model's)", lo=16, hi=4096, multiple_of=8)
    samples: int = option(2, "samples per concept", "noisy states sampled for each LoRA", lo=1, hi=64)
    sampling_steps: int = option(20, "sampling steps", "sampling steps of each LoRA alone (data-free inputs)", lo=1, hi=200)
    guidance: float | None = option(None, "guidance", "CFG of the sampling that makes the inputs (unset: the host's)", lo=0.0, hi=30.0)
    seed: int = option(0, "seed", "seed of the sampled inputs", lo=0, hi=2**63 - 1)
    precision: str = option(
        "auto", "precision", "compute precision (auto: the model's; an fp16 overflow retries in fp32)", choices=PRECISIONS
    )
    gradient_checkpointing: bool = option(False, "gradient checkpointing", "recompute each block in the backward pass: less memory, slower")
    form: str = option("auto", "form", "patched layers: fused (fast), side (less memory) or auto", choices=FORMS)
    inputs: str = option(
        "data-free", "inputs", "what the mergers learn from: each LoRA's own samples, or reference images", choices=INPUT_KINDS
    )
    content_images: tuple[str, ...] = option((), "subject images", "1 to 10 subject reference images (inputs: images)")
    style_images: tuple[str, ...] = option((), "style images", "1 style reference image (inputs: images)")
    merge_text_encoders: bool = option(True, "merge text encoders", "learn mergers for the text-encoder layers too (where the host can)")

    def validated(self) -> MergeRequest:
        """A checked copy (the output name normalised); raises ``InvalidRequestError`` with one line."""
        request = validate(self)
        if request.inputs == "images":
            if not 1 <= len(request.content_images) <= 10:
                raise InvalidRequestError("give 1 to 10 subject reference images")
            if len(request.style_images) != 1:
                raise InvalidRequestError("give exactly 1 style reference image")
        return request

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> MergeRequest:
        """From JSON (the API): unknown keys are an error, not silently dropped."""
        return from_json(cls, data)


@dataclass(frozen=True)
class ReexportRequest:
    """Write a ZipLoRA output again from its saved mergers with another style multiplier (seconds, no optimisation)."""

    name: str = option(
        REQUIRED,
        "merged LoRA",
        "a ZipLoRA output in the LoRA folder (on the command line, a file)",
        check=_picked("merged LoRA"),
        flag="output",
    )
    style_multiplier: float = reuse(MergeRequest, "style_multiplier")

    def validated(self) -> ReexportRequest:
        return validate(self)

    @classmethod
    def from_dict(cls, data: Any) -> ReexportRequest:
        return from_json(cls, data)
