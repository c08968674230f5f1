"""The ZipLoRA loss (DESIGN, "The method"): the one the optimisation runs, term by term.

    L = rec(eps_m(x_c), eps_c(x_c)) + rec(eps_m(x_s), eps_s(x_s)) + λ Σ_layers sim(m_c, m_s)

``sim`` is the paper's formula ``|m_c · m_s|`` ("dot") or its wording ``|cos(m_c, m_s)|`` ("cos"); ``rec``
sums ("sum") or averages ("mean") the squared error over a sample's elements, then averages over the batch.
The defaults and why are in ``ziplora.merge.optimize.ZipOptions`` and docs/quality.md. Note that ``|cos|``
has a zero gradient at m_c = m_s = 1, so it only acts once the reconstruction terms have moved the mergers,
while ``|m_c · m_s|`` pulls every coefficient down by λ·m_s from the first step.

Every layer's mergers live in two flat vectors (``MergerBank``); ``segment[i]`` names the layer of element i,
so the per-layer sums are one ``index_add_`` each. :func:`zip_loss` is what each optimisation step calls; a new
term is computed there, added to ``total`` and given a field in :class:`LossTerms`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["reconstruction", "layer_similarity", "layer_similarities", "zip_loss", "LossTerms", "SIMILARITIES", "REDUCTIONS"]

SIMILARITIES = ("dot", "cos")
REDUCTIONS = ("sum", "mean")


def reconstruction(pred: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Squared error per sample (summed or averaged over its elements), averaged over the batch, in fp32."""
    err = (pred.float() - target.float()).square().flatten(1)
    per_sample = err.sum(1) if reduction == "sum" else err.mean(1)
    return per_sample.mean()


def _segment_sums(values: torch.Tensor, segment: torch.Tensor, layers: int) -> torch.Tensor:
    return torch.zeros(layers, device=values.device, dtype=values.dtype).index_add_(0, segment, values)


def layer_similarities(m_c: torch.Tensor, m_s: torch.Tensor, segment: torch.Tensor, layers: int, kind: str = "dot") -> torch.Tensor:
    """Every layer's similarity at once: ``|m_c·m_s|`` ("dot") or ``|cos(m_c, m_s)|`` ("cos"), shape [layers].

    ``m_c``, ``m_s``: all layers' mergers end to end; ``segment``: the layer index of each element.
    """
    dots = _segment_sums(m_c * m_s, segment, layers)
    if kind == "cos":
        norms = (_segment_sums(m_c.square(), segment, layers) * _segment_sums(m_s.square(), segment, layers)).clamp_min(1e-16).sqrt()
        return (dots / norms).abs()
    return dots.abs()


def layer_similarity(m_c: torch.Tensor, m_s: torch.Tensor, kind: str = "dot") -> torch.Tensor:
    """One layer's similarity (a 0-d tensor): :func:`layer_similarities` with a single layer."""
    return layer_similarities(m_c, m_s, torch.zeros(m_c.numel(), dtype=torch.long, device=m_c.device), 1, kind)[0]


@dataclass(frozen=True)
class LossTerms:
    """One step's loss, term by term (0-d fp32 tensors; ``total`` is what is minimised)."""

    content: torch.Tensor
    style: torch.Tensor
    similarity: torch.Tensor  # Σ_layers sim(m_c, m_s), before λ
    total: torch.Tensor

    def detached(self) -> torch.Tensor:
        """[content, style, similarity, total], detached: what a step reports."""
        return torch.stack([self.content.detach(), self.style.detach(), self.similarity.detach(), self.total.detach()])


def zip_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    m_c: torch.Tensor,
    m_s: torch.Tensor,
    segment: torch.Tensor,
    layers: int,
    *,
    lam: float,
    similarity: str = "dot",
    reduction: str = "sum",
) -> LossTerms:
    """The loss of one step whose batch holds the content state first and the style state second.

    ``pred``: the merged model's predictions; ``target``: each teacher's prediction at its own state.
    """
    content = reconstruction(pred[:1], target[:1], reduction)
    style = reconstruction(pred[1:], target[1:], reduction)
    sim = layer_similarities(m_c, m_s, segment, layers, similarity).sum()
    return LossTerms(content, style, sim, content + style + lam * sim)
