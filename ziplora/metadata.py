"""Metadata of a merged file: kohya ``ss_*`` keys, ModelSpec keys, ``ziplora_*`` provenance and the sidecar.

One builder assembles every key from named constants, so the tab, the CLI and the API write identical
headers (see ../shared/reference/style-and-conventions.md, part B).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from ziplora import __version__

__all__ = ["Provenance", "SourceInfo", "build_metadata", "build_sidecar", "merge_tag_frequency", "SS", "MS", "ZL"]


class SS:
    """kohya sd-scripts keys."""

    BASE_MODEL_VERSION = "ss_base_model_version"
    V2 = "ss_v2"
    NETWORK_MODULE = "ss_network_module"
    NETWORK_DIM = "ss_network_dim"
    NETWORK_ALPHA = "ss_network_alpha"
    NETWORK_ARGS = "ss_network_args"
    OUTPUT_NAME = "ss_output_name"
    TRAINING_COMMENT = "ss_training_comment"
    TAG_FREQUENCY = "ss_tag_frequency"
    SD_MODEL_NAME = "ss_sd_model_name"


class MS:
    """Stability-AI ModelSpec 1.0.1 keys."""

    SPEC = "modelspec.sai_model_spec"
    ARCHITECTURE = "modelspec.architecture"
    IMPLEMENTATION = "modelspec.implementation"
    IMPLEMENTATION_VERSION = "modelspec.implementation_version"
    TITLE = "modelspec.title"
    RESOLUTION = "modelspec.resolution"
    DATE = "modelspec.date"
    HASH = "modelspec.hash_sha256"
    DESCRIPTION = "modelspec.description"
    AUTHOR = "modelspec.author"
    MERGED_FROM = "modelspec.merged_from"
    TRIGGER_PHRASE = "modelspec.trigger_phrase"
    USAGE_HINT = "modelspec.usage_hint"
    PREDICTION_TYPE = "modelspec.prediction_type"
    TAGS = "modelspec.tags"


class ZL:
    """Our own provenance keys."""

    VERSION = "ziplora_version"
    METHOD = "ziplora_method"
    CONTENT = "ziplora_content"
    CONTENT_SHA256 = "ziplora_content_sha256"
    STYLE = "ziplora_style"
    STYLE_SHA256 = "ziplora_style_sha256"
    CONTENT_WEIGHT = "ziplora_content_weight"
    STYLE_MULTIPLIER = "ziplora_style_multiplier"
    STEPS = "ziplora_steps"
    LAMBDA = "ziplora_lambda"
    LR = "ziplora_lr"
    SIMILARITY = "ziplora_similarity"
    FINAL_SIMILARITY = "ziplora_final_similarity"
    INPUTS = "ziplora_inputs"
    TARGET_RANK = "ziplora_target_rank"
    SVD_ERROR = "ziplora_svd_relative_error"
    MERGERS_FILE = "ziplora_mergers_file"
    BUNDLED_EMBEDDINGS = "ziplora_bundled_embeddings"


@dataclass(frozen=True)
class SourceInfo:
    """What the output records about one input LoRA."""

    name: str
    title: str
    sha256: str  # addnet hash (tensor data)
    trigger_words: tuple[str, ...]
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Provenance:
    """How the merge was made (the parts of the header that describe the method)."""

    method: str  # "ziplora" | "direct"
    content_weight: float = 1.0
    style_multiplier: float = 1.0
    steps: int | None = None
    lam: float | None = None
    lr: float | None = None
    similarity: str | None = None  # "dot" | "cos"
    final_similarity: float | None = None
    inputs: str | None = None  # "data-free" | "reference images"
    target_rank: int | None = None


def merge_tag_frequency(sources: Iterable[tuple[str, dict[str, dict[str, int]]]]) -> dict[str, dict[str, int]]:
    """Union of the inputs' ``ss_tag_frequency`` maps; a folder name both use is kept apart per input."""
    out: dict[str, dict[str, int]] = {}
    for label, freq in sources:
        for folder, tags in freq.items():
            name = folder if folder not in out else f"{folder} ({label})"
            out[name] = dict(tags)
    return out


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def build_metadata(
    *,
    output_name: str,
    content: SourceInfo,
    style: SourceInfo,
    provenance: Provenance,
    ranks: list[int],
    alpha: float,
    base_model_version: str = "sdxl_base_v1-0",
    architecture: str = "stable-diffusion-xl-v1-base/lora",
    resolution: str = "1024x1024",
    description: str = "",
    author: str = "",
    svd_error: float | None = None,
    mergers_file: str | None = None,
    embeddings: Iterable[str] = (),
    now: _dt.datetime | None = None,
) -> dict[str, str]:
    """Every header key of a merged file (values are strings, as safetensors requires)."""
    dims = sorted(set(ranks))
    words = list(dict.fromkeys([*content.trigger_words, *style.trigger_words]))
    tags = merge_tag_frequency([(content.name, content.tag_frequency), (style.name, style.tag_frequency)])
    if not tags and words:
        tags = {f"1_{output_name}": {w: 1 for w in words}}
    when = (now or _dt.datetime.now()).replace(microsecond=0).isoformat()
    weight_text = f"content x{_fmt(provenance.content_weight)}, style x{_fmt(provenance.style_multiplier)}"
    comment = f"{provenance.method} merge of {content.name} (content) and {style.name} (style); {weight_text}"
    meta = {
        SS.BASE_MODEL_VERSION: base_model_version,
        SS.V2: "False",
        SS.NETWORK_MODULE: "networks.lora",
        SS.NETWORK_DIM: str(dims[0]) if len(dims) == 1 else "Dynamic",
        SS.NETWORK_ALPHA: _fmt(alpha),
        SS.NETWORK_ARGS: "{}",
        SS.OUTPUT_NAME: output_name,
        SS.TRAINING_COMMENT: comment,
        SS.TAG_FREQUENCY: json.dumps(tags, ensure_ascii=False),
        MS.SPEC: "1.0.1",
        MS.ARCHITECTURE: architecture,
        MS.IMPLEMENTATION: "https://github.com/Stability-AI/generative-models",
        MS.IMPLEMENTATION_VERSION: f"sd-webui-ziplora/{__version__}",
        MS.TITLE: output_name,
        MS.RESOLUTION: resolution,
        MS.DATE: when,
        MS.DESCRIPTION: description or comment,
        MS.MERGED_FROM: f"{content.title}, {style.title}",
        MS.PREDICTION_TYPE: "epsilon",
        ZL.VERSION: __version__,
        ZL.METHOD: provenance.method,
        ZL.CONTENT: content.name,
        ZL.CONTENT_SHA256: content.sha256,
        ZL.STYLE: style.name,
        ZL.STYLE_SHA256: style.sha256,
        ZL.CONTENT_WEIGHT: _fmt(provenance.content_weight),
        ZL.STYLE_MULTIPLIER: _fmt(provenance.style_multiplier),
    }
    if words:
        meta[MS.TRIGGER_PHRASE] = ", ".join(words)
        meta[MS.USAGE_HINT] = f"<lora:{output_name}:1> " + ", ".join(words)
    if author:
        meta[MS.AUTHOR] = author
    optional = {
        ZL.STEPS: provenance.steps,
        ZL.LAMBDA: provenance.lam,
        ZL.LR: provenance.lr,
        ZL.SIMILARITY: provenance.similarity,
        ZL.FINAL_SIMILARITY: provenance.final_similarity,
        ZL.INPUTS: provenance.inputs,
        ZL.TARGET_RANK: provenance.target_rank,
        ZL.SVD_ERROR: svd_error,
        ZL.MERGERS_FILE: mergers_file,
    }
    for key, value in optional.items():
        if value is not None:
            meta[key] = _fmt(value) if isinstance(value, float) else str(value)
    emb = sorted(embeddings)
    if emb:
        meta[ZL.BUNDLED_EMBEDDINGS] = ", ".join(emb)
    return meta


def build_sidecar(
    *,
    content: SourceInfo,
    style: SourceInfo,
    provenance: Provenance,
    description: str = "",
    sd_version: str = "SDXL",
) -> dict[str, object]:
    """The A1111 / Forge user-metadata sidecar ``<name>.json`` (keys exactly as A1111 writes them)."""
    words = list(dict.fromkeys([*content.trigger_words, *style.trigger_words]))
    notes = (
        f"ZipLoRA ({provenance.method}) of {content.name} (subject) and {style.name} (style), "
        f"style multiplier {_fmt(provenance.style_multiplier)}. Made with sd-webui-ziplora {__version__}."
    )
    return {
        "description": description or f"{content.title} in the style of {style.title} (merged with ZipLoRA)",
        "sd version": sd_version,
        "activation text": ", ".join(words),
        "preferred weight": 1.0,
        "negative text": "",
        "notes": notes,
    }
