"""Pass 1 of a write: every layer's written rank and shape, which the file's header needs before any data.

Plain LoRA / LoCon layers give theirs from the input headers alone; the others (LoHa, LoKr, full, Tucker) are
merged now and kept until they are written. The alpha every layer is written with is the most common rank.

A layer that carries a bias delta is written in full form (``diff`` + ``diff_b``): the only form whose bias delta
A1111 loads (``network_full``; next to ``lora_up`` / ``lora_down`` it ignores ``diff_b``); Forge loads it too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from ziplora.export.layer_merge import MergedLayer, merge_layer
from ziplora.export.options import ExportOptions, Mergers
from ziplora.formats.families import reference_shapes
from ziplora.formats.keys import LayerKey
from ziplora.formats.lorafile import LoraFile

__all__ = ["LayerPlan", "WritePlan", "plan_layers"]


@dataclass(frozen=True)
class LayerPlan:
    rank: int
    shape: tuple[int, ...]  # the delta's: (out, in) or (out, in, kh, kw)
    core: int | None  # the Tucker core's output rank, when the layer is written with a lora_mid
    full: bool = False  # written as a dense diff with its bias delta (diff_b), not as lora factors


@dataclass
class WritePlan:
    layers: dict[LayerKey, LayerPlan]
    computed: dict[LayerKey, MergedLayer]  # the layers merged already (taken out as they are written)
    alpha: float
    need_norms: bool  # whether every layer's norm is needed to weigh the file's SVD error


def _module_shape(key: LayerKey, content: LoraFile, style: LoraFile, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The module's own shape for a delta of the same size: a 1x1-conv-shaped delta on a Linear, or the reverse."""
    ref = reference_shapes((content if key in content.groups else style).family)
    if ref is not None and key in ref and ref[key] != shape and math.prod(ref[key]) == math.prod(shape):
        return ref[key]
    return shape


def _header_plan(key: LayerKey, content: LoraFile, style: LoraFile, target_rank: int | None) -> tuple[int, tuple[int, ...]] | None:
    """(written rank, delta shape) from the headers alone, for plain LoRA/LoCon layers; None otherwise."""
    ranks = []
    shape: tuple[int, ...] | None = None
    for lora in (content, style):
        if key not in lora.groups:
            continue
        g = lora.groups[key]
        if lora.layer_kind(key) not in ("lora", "locon") or not {"lora_up", "lora_down"} <= set(g):
            return None  # read in full: the layer's own checks say what is wrong with an incomplete one
        up, down = lora.st.tensors[g["lora_up"]].shape, lora.st.tensors[g["lora_down"]].shape
        if len(up) not in (2, 4) or len(down) not in (2, 4):
            return None  # likewise for factors that are no matrices
        ranks.append(int(down[0]))
        shape = (int(up[0]), int(down[1]), *(int(d) for d in down[2:]))
    assert shape is not None
    shape = _module_shape(key, content, style, shape)
    rank = sum(ranks)
    if target_rank is not None:
        rank = min(rank, target_rank)
    return rank, shape


def plan_layers(keys: list[LayerKey], content: LoraFile, style: LoraFile, mergers: Mergers | None, options: ExportOptions) -> WritePlan:
    computed: dict[LayerKey, MergedLayer] = {}
    plans: dict[LayerKey, LayerPlan] = {}
    for key in keys:
        header = _header_plan(key, content, style, options.target_rank)
        if header is None:
            res = merge_layer(key, content, style, mergers, options)
            computed[key] = res
            f = res.factors
            if f.bias is not None:
                plans[key] = LayerPlan(f.dim, _module_shape(key, content, style, f.shape), None, full=True)
            else:
                plans[key] = LayerPlan(f.dim, f.shape, None if f.mid is None else int(f.mid.shape[0]))
        else:
            plans[key] = LayerPlan(header[0], header[1], None)
    ranks = Counter(p.rank for p in plans.values() if not p.full)
    alpha = float(ranks.most_common(1)[0][0]) if ranks else 1.0
    need_norms = options.target_rank is not None or any(r.err2 > 0 for r in computed.values())
    return WritePlan(plans, computed, alpha, need_norms)
