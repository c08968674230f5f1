"""The ZipLoRA loss as pure functions (DESIGN, "The method").

    L = rec(eps_m(x_c), eps_c(x_c)) + rec(eps_m(x_s), eps_s(x_s)) + λ Σ_layers sim(m_c, m_s)

``sim`` is the paper's formula ``|m_c · m_s|`` ("dot") or its wording ``|cos(m_c, m_s)|`` ("cos"); ``rec``
sums ("sum") or averages ("mean") the squared error over a sample's elements, then averages over the batch.
The defaults and why are in ``ziplora.merge.optimize.ZipOptions`` and docs/quality.md. Note that ``|cos|``
has a zero gradient at m_c = m_s = 1, so it only acts once the reconstruction terms have moved the mergers,
while ``|m_c · m_s|`` pulls every coefficient down by λ·m_s from the first step.
"""

from __future__ import annotations

import torch

__all__ = ["reconstruction", "layer_similarity", "SIMILARITIES", "REDUCTIONS"]

SIMILARITIES = ("dot", "cos")
REDUCTIONS = ("sum", "mean")


def reconstruction(pred: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Squared error per sample (summed or averaged over its elements), averaged over the batch, in fp32."""
    err = (pred.float() - target.float()).square().flatten(1)
    per_sample = err.sum(1) if reduction == "sum" else err.mean(1)
    return per_sample.mean()


def layer_similarity(m_c: torch.Tensor, m_s: torch.Tensor, kind: str = "dot") -> torch.Tensor:
    """One layer's similarity: ``|m_c·m_s|`` ("dot") or ``|cos(m_c, m_s)|`` ("cos").

    The reference definition; the optimisation computes all layers at once (``MergerBank.similarity``).
    """
    if kind == "cos":
        return torch.nn.functional.cosine_similarity(m_c, m_s, dim=0, eps=1e-8).abs()
    return (m_c * m_s).sum().abs()
