"""Merger vectors, module patching, the loss and the optimisation loop."""

from __future__ import annotations

from ziplora.merge.loss import mean_abs_cos, reconstruction, similarity_term
from ziplora.merge.optimize import MergerMovement, NonFiniteLoss, ZipOptions, ZipResult, build_parts, optimize_mergers
from ziplora.merge.patch import MODES, Part, PatchSet, ZipLayer, patch_layers

__all__ = [
    "mean_abs_cos",
    "reconstruction",
    "similarity_term",
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
