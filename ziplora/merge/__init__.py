"""Merger vectors, module patching, the loss and the optimisation loop."""

from __future__ import annotations

from ziplora.merge.loss import LossTerms, layer_similarities, layer_similarity, reconstruction, zip_loss
from ziplora.merge.optimize import MergerBank, MergerMovement, NonFiniteLoss, ZipOptions, ZipResult, build_parts, optimize_mergers
from ziplora.merge.patch import MODES, Part, PatchSet, ZipLayer, patch_layers

__all__ = [
    "LossTerms",
    "layer_similarities",
    "layer_similarity",
    "reconstruction",
    "zip_loss",
    "MergerBank",
    "MergerMovement",
    "NonFiniteLoss",
    "ZipOptions",
    "ZipResult",
    "build_parts",
    "optimize_mergers",
    "MODES",
    "Part",
    "PatchSet",
    "ZipLayer",
    "patch_layers",
]
