"""Base-model families: what a LoRA was made for, and the module shapes of the families we merge for."""

from __future__ import annotations

import functools
import re
from enum import Enum

from ziplora.architecture.sdxl_base import sdxl_base_shapes
from ziplora.architecture.toyxl import toyxl_shapes
from ziplora.formats.keys import LayerKey, ParsedKey

__all__ = ["Family", "detect_family", "reference_shapes", "CHECKPOINT_PREFIXES"]


class Family(str, Enum):
    SDXL = "SDXL"
    SDXL_REFINER = "SDXL refiner"
    SD1 = "SD1.x"
    SD2 = "SD2.x"
    SD3 = "SD3"
    FLUX = "Flux"
    TOYXL = "ToyXL"
    UNKNOWN = "unknown"

    @property
    def label(self) -> str:
        return self.value


CHECKPOINT_PREFIXES = (
    "model.diffusion_model.",
    "conditioner.embedders.",
    "first_stage_model.",
    "cond_stage_model.",
    "model_ema.",
    "diffusion_model.",
)

# Markers in raw tensor keys of LoRAs for transformer-based models.
_FLUX = re.compile(r"(double_blocks|single_blocks|single_transformer_blocks)")
_SD3 = re.compile(r"(joint_blocks|context_block|x_block|transformer\.transformer_blocks\.\d+\.attn\.add_q_proj)")

# widths of the cross-attention context / text encoders per family
_CONTEXT = {768: Family.SD1, 1024: Family.SD2, 2048: Family.SDXL, 1280: Family.SDXL_REFINER}


def detect_family(
    raw_keys: list[str],
    parsed: dict[str, ParsedKey],
    unet_paths: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
    metadata: dict[str, str],
) -> tuple[Family, str]:
    """Decide the family from the layout and the shapes (which cannot lie), then from metadata.

    ``unet_paths`` maps tensor keys of UNet layers to their sgm path; ``shapes`` maps tensor keys to shapes.
    Returns (family, evidence).
    """
    joined = "\n".join(raw_keys)
    if _FLUX.search(joined):
        return Family.FLUX, "Flux transformer block names (double_blocks / single_blocks)"
    if _SD3.search(joined):
        return Family.SD3, "SD3 MMDiT block names (joint_blocks / context_block)"
    if any(p.component == "te" for p in parsed.values()):
        width = _te_width(parsed, shapes, "te")
        fam = Family.SD2 if width == 1024 or metadata.get("ss_v2") == "True" else Family.SD1
        return fam, f"a single text encoder (lora_te_ keys{f', width {width}' if width else ''})"
    for path in unet_paths.values():
        m = re.match(r"^(input_blocks\.(1|2)\.1|output_blocks\.(9|10|11)\.|input_blocks\.(9|10|11)\.)", path)
        if m:
            fam = _context_family(parsed, shapes, unet_paths) or Family.SD1
            return fam, f"attention at {path.rsplit('.transformer_blocks', 1)[0]}, which SDXL does not have"
    layer_of = {
        tkey: LayerKey("unet", unet_paths[tkey]) if p.component == "unet" else LayerKey(p.component, p.raw_path)
        for tkey, p in parsed.items()
        if (p.component == "unet" and tkey in unet_paths) or p.component in ("te1", "te2")
    }
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    says_toy = version.startswith("toyxl") or arch.startswith("toyxl")
    name_only = None
    for family in (Family.SDXL, Family.TOYXL):
        checked, mismatch = _match_shapes(family, layer_of, parsed, shapes)
        if checked and mismatch is None:
            return family, f"every layer matches {family.label}'s modules ({checked} checked)"
        if not checked and mismatch is None and layer_of and name_only is None:
            name_only = family
    if name_only is not None:
        # factors whose shapes say nothing alone (LoKr): the names decide, and the metadata between the two
        family = Family.TOYXL if says_toy else name_only
        return family, f"layer names match {family.label} (shapes checked per layer on reading)"
    context = _context_family(parsed, shapes, unet_paths)
    if context is not None and context != Family.SDXL:
        return context, "cross-attention input width"
    te1, te2 = _te_width(parsed, shapes, "te1"), _te_width(parsed, shapes, "te2")
    if says_toy:
        return Family.TOYXL, f"metadata ss_base_model_version={version or arch}"
    if unet_paths or te1 is not None or te2 is not None:
        width = _context_width(parsed, shapes, unet_paths)
        return Family.UNKNOWN, f"an SDXL-like layout with unknown widths (context {width}, text encoders {te1}/{te2})"
    return Family.UNKNOWN, "no layer names of a known model"


def _match_shapes(
    family: Family, layer_of: dict[str, LayerKey], parsed: dict[str, ParsedKey], shapes: dict[str, tuple[int, ...]]
) -> tuple[int, str | None]:
    """How many factor shapes were checked against the family's modules, and the first that did not fit."""
    ref = reference_shapes(family)
    assert ref is not None
    checked = 0
    for tkey, key in layer_of.items():
        suffix, shape = parsed[tkey].suffix, shapes[tkey]
        target = ref.get(key)
        if target is None:
            return checked, tkey
        if suffix in ("lora_down", "hada_w1_b", "hada_w2_b") and len(shape) >= 2:
            fits = shape[1] == target[1] or (len(target) == 4 and shape[1] == target[1] * target[2] * target[3])
        elif suffix in ("lora_up", "hada_w1_a", "hada_w2_a") and len(shape) >= 1:
            fits = shape[0] == target[0]
        elif suffix == "diff":
            fits = tuple(shape) == tuple(target)
        else:
            continue
        if not fits:
            return checked, tkey
        checked += 1
    return checked, None


def _te_width(parsed: dict[str, ParsedKey], shapes: dict[str, tuple[int, ...]], component: str) -> int | None:
    for tkey, p in parsed.items():
        if p.component == component and p.suffix == "lora_down" and p.raw_path.endswith("self_attn.q_proj"):
            shape = shapes[tkey]
            return int(shape[1]) if len(shape) >= 2 else None
    return None


def _context_width(parsed: dict[str, ParsedKey], shapes: dict[str, tuple[int, ...]], unet_paths: dict[str, str]) -> int | None:
    for tkey, path in unet_paths.items():
        if parsed[tkey].suffix == "lora_down" and re.search(r"attn2\.to_[kv]$", path):
            shape = shapes[tkey]
            return int(shape[1]) if len(shape) >= 2 else None
        if parsed[tkey].suffix == "hada_w1_b" and re.search(r"attn2\.to_[kv]$", path):
            return int(shapes[tkey][1])
    return None


def _context_family(parsed: dict[str, ParsedKey], shapes: dict[str, tuple[int, ...]], unet_paths: dict[str, str]) -> Family | None:
    width = _context_width(parsed, shapes, unet_paths)
    return None if width is None else _CONTEXT.get(width)


# ---------------------------------------------------------------------------------------------------------
# Module weight shapes per family, so every layer of a file is checked against the model it claims.


@functools.lru_cache(maxsize=4)
def reference_shapes(family: Family) -> dict[LayerKey, tuple[int, ...]] | None:
    """Weight shapes of every Linear / conv a LoRA may target, for SDXL and ToyXL; None for others.

    SDXL's are pinned data (``ziplora/architecture/sdxl_base.json``); ToyXL's come from its configuration.
    """
    if family == Family.SDXL:
        by_component = sdxl_base_shapes()
    elif family == Family.TOYXL:
        by_component = toyxl_shapes()
    else:
        return None
    return {LayerKey(component, path): shape for component, shapes in by_component.items() for path, shape in shapes.items()}
