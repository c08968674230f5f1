"""Rank and SVD error bookkeeping: what a factorisation or a target rank drops, and the relative error it makes.

Errors are carried as squared Frobenius norms (``err2``) beside each layer's squared norm (``norm2``), so a layer's,
a header's and a whole file's relative error are all :func:`relative_error` of sums.
"""

from __future__ import annotations

import math

from ziplora.formats.factors import Factors, truncate_factors

__all__ = ["dropped_by_svd", "truncate_to_rank", "relative_error"]


def dropped_by_svd(kept: Factors, err: float) -> float:
    """The energy an SVD with relative error ``err`` dropped, from what it kept (``err^2 / (1 - err^2)`` of it)."""
    return kept.norm2() * err * err / max(1e-12, 1 - err * err)


def truncate_to_rank(merged: Factors, rank: int) -> tuple[Factors, float]:
    """The best rank-``rank`` approximation of a merged layer, and the energy it dropped."""
    kept = merged.norm2()
    truncated, err = truncate_factors(merged, rank)
    return truncated, kept * err * err


def relative_error(norm2: float, err2: float) -> float:
    """sqrt(dropped / total energy); 0 when nothing was dropped or there is nothing."""
    return math.sqrt(err2 / norm2) if norm2 > 0 and err2 > 0 else 0.0
