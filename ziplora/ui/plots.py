"""The tab's plots: matplotlib ``Figure`` objects without pyplot (thread-safe, the same on gradio 3 and 4)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["loss_figure", "similarity_figure"]


def _figure(width: float = 6.4, height: float = 3.0):  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def loss_figure(records: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    """Content, style and similarity loss per step (similarity on its own axis: its scale differs)."""
    fig, ax = _figure()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["content"] for r in records], label="content", color="tab:blue", marker="." if len(steps) < 30 else None)
    ax.plot(steps, [r["style"] for r in records], label="style", color="tab:orange", marker="." if len(steps) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("reconstruction loss")
    sim = ax.twinx()
    sim.plot(steps, [r["similarity"] for r in records], label="similarity", color="tab:green", linestyle="--",
             marker="x" if len(steps) < 30 else None)  # fmt: skip
    sim.set_ylabel("similarity term")
    for axis in (ax, sim):
        axis.ticklabel_format(axis="y", useOffset=False, style="plain")
    lines = ax.get_lines() + sim.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize="small")
    ax.set_title("ZipLoRA losses" if records else "ZipLoRA losses (waiting for the first step)", fontsize="medium")
    if not records:
        ax.set_xlim(0, 1)
    return fig


def similarity_figure(cos_before: dict[Any, float], cos_after: dict[Any, float]):  # type: ignore[no-untyped-def]
    """The paper's Fig. 3 in spirit: per merged layer, |cos| between the content and the style deltas as
    merged, before (the direct merge) and after ZipLoRA (``ZipResult.overlap_before`` / ``overlap_after``)."""
    keys = sorted(set(cos_before) | set(cos_after), key=str)
    fig, ax = _figure()
    xs = list(range(len(keys)))
    small = len(keys) <= 60
    ax.plot(xs, [cos_before.get(k, float("nan")) for k in keys], label="before (direct merge)", color="0.55",
            marker="o" if small else None, linestyle="-" if not small else "none", markersize=4)  # fmt: skip
    ax.plot(xs, [cos_after.get(k, float("nan")) for k in keys], label="after ZipLoRA", color="tab:red",
            marker="o" if small else None, linestyle="-" if not small else "none", markersize=4)  # fmt: skip
    ax.set_xlabel(f"merged layer ({len(keys)} layers both LoRAs touch, by name)")
    ax.set_ylabel("|cos(ΔW_c·m_c, ΔW_s·m_s)|")
    values = [v for v in (*cos_before.values(), *cos_after.values()) if math.isfinite(v)]
    ax.set_ylim(0, max(values) * 1.1 if values and max(values) > 0 else 1.0)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("How much the two LoRAs overlap, per layer", fontsize="medium")
    return fig
