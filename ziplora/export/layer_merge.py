"""One written layer from both sources: ``dW_c·diag(m_c)·w_c + dW_s·diag(m_s)·w_s`` as concatenated factors.

For a layer both sources touch this is exactly the LoRA with ``up = [B_c s_c w_c | B_s s_s w_s]`` and
``down = [A_c·diag(m_c); A_s·diag(m_s)]`` (DESIGN, "Exact export"); a layer one source touches is kept as it is
(times its weight). Kinds without an exact low-rank form arrive as SVD factors, whose error is accounted here.
A bias delta (``diff_b``) adds: ``b_c·w_c + b_s·w_s``, whatever the mergers; such a layer is written in full form
(see ``plan``), so the target rank does not apply to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ziplora.errors import IncompatibleLorasError
from ziplora.export.options import ExportOptions, LayerReport, Mergers
from ziplora.export.rank import dropped_by_svd, relative_error, truncate_to_rank
from ziplora.formats.factors import Factors
from ziplora.formats.keys import LayerKey
from ziplora.formats.lorafile import LoraFile

__all__ = ["MergedLayer", "merge_layer"]


@dataclass
class MergedLayer:
    factors: Factors
    report: LayerReport
    norm2: float  # squared Frobenius norm of the exact merged delta
    err2: float  # squared Frobenius norm of what the SVDs dropped


def _source_part(lora: LoraFile, key: LayerKey, weight: float, merger: torch.Tensor | None) -> tuple[Factors, float]:
    """One source's factors for the layer, merger and weight applied, and its SVD's relative error (0: exact)."""
    f, err, _ = lora.layer(key).factors()
    if merger is not None:
        if merger.dim() != 1 or merger.numel() != f.shape[1] or not bool(torch.isfinite(merger).all()):
            raise IncompatibleLorasError(
                f"layer {key.path}: the mergers ({list(merger.shape)}) do not fit its {f.shape[1]} input columns or are not finite; merge again"
            )
        f = f.scale_inputs(merger.float())
    if weight != 1.0:
        f = f.scale_outputs(weight)
    return f, err


def merge_layer(
    key: LayerKey,
    content: LoraFile,
    style: LoraFile,
    mergers: Mergers | None,
    options: ExportOptions,
    need_norm: bool = True,
) -> MergedLayer:
    """Read one layer from both files and build its written factors.

    ``need_norm``: the layer's norm only weighs the file's overall SVD error; exact files skip it.
    """
    parts: list[Factors] = []
    err2 = 0.0
    how = "exact"
    for lora, weight, index in ((content, options.content_weight, 0), (style, options.style_multiplier, 1)):
        if key not in lora.groups:
            continue
        merger = mergers[key][index] if mergers is not None and key in mergers else None
        f, err = _source_part(lora, key, weight, merger)
        if err:
            err2 += dropped_by_svd(f, err)
            how = "svd"
        parts.append(f)
    if len(parts) == 2 and parts[0].shape != parts[1].shape:
        raise IncompatibleLorasError(
            f"layer {key.path}: content delta {list(parts[0].shape)} and style delta {list(parts[1].shape)} differ"
        )
    merged = Factors.concat(parts)
    norm2 = merged.norm2() + err2 if (need_norm or err2 > 0 or options.target_rank is not None) else 0.0
    if options.target_rank is not None and merged.rank > options.target_rank and merged.bias is None:
        merged, dropped = truncate_to_rank(merged, options.target_rank)
        err2 += dropped
        how = "svd"
    sources = "both" if len(parts) == 2 else ("content" if key in content.groups else "style")
    return MergedLayer(merged, LayerReport(key, sources, merged.dim, how, relative_error(norm2, err2)), norm2, err2)
