"""What the tab shows in its status and result boxes: one escaped line each, styled by kind (style.css)."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from ziplora.errors import ZipLoraError

log = logging.getLogger("ziplora.ui")

__all__ = ["message", "error_html", "progress_html", "result_html"]


def _escape(text: object) -> str:
    return html.escape(str(text), quote=False)


def _one_line(text: object, limit: int = 500) -> str:
    return " ".join(str(text).split())[:limit]


def message(text: str, kind: str = "info") -> str:
    """Status HTML: one escaped line in a styled box (kind: info, ok, error)."""
    return f'<div class="ziplora-msg ziplora-msg-{kind}">{_escape(text)}</div>'


def error_html(err: BaseException) -> str:
    """A readable one-line message for any failure; the traceback goes to the log, never to the page."""
    if isinstance(err, ZipLoraError):
        return message(str(err), "error")
    log.exception("ZipLoRA tab: unexpected error")
    return message(f"internal error: {type(err).__name__}: {_one_line(err)}", "error")


def progress_html(data: dict[str, Any]) -> str:
    """Stage, step, ETA and a bar, from ``JobStatus.to_dict()``."""
    stage = data.get("stage") or "Starting"
    step, steps = int(data.get("step") or 0), int(data.get("steps") or 0)
    parts = [stage]
    if steps:
        parts.append(f"{step}/{steps}")
    eta = data.get("eta_seconds")
    if eta is not None:
        parts.append(f"about {eta:.0f} s left" if eta >= 1 else "almost done")
    if data.get("text"):
        parts.append(str(data["text"]))
    share = 100.0 * step / steps if steps else 0.0
    return (
        f'<div class="ziplora-msg ziplora-msg-info ziplora-progress" data-step="{step}" data-steps="{steps}">'
        f'<div class="ziplora-bar"><div class="ziplora-bar-fill" style="width: {share:.1f}%"></div></div>'
        f"<span>{_escape(' - '.join(parts))}</span></div>"
    )


def result_html(result: dict[str, Any], seconds: float | None) -> str:
    """What a finished merge did: the file, the optimisation and how far the mergers moved."""
    ranks = ", ".join(f"rank {r} x{n}" for r, n in sorted(result.get("ranks", {}).items()))
    size = result.get("size_bytes", 0) / 2**20
    lines = [
        f"Wrote <b>{_escape(Path(result['file']).name)}</b> to {_escape(Path(result['file']).parent)} "
        f"({result.get('layers', 0)} layers, {ranks}; {size:.1f} MiB; hash {_escape(result.get('shorthash', ''))})"
    ]
    if "steps" in result:
        move = result.get("merger_movement") or {}
        lines.append(
            f"ZipLoRA: {result['steps']} steps ({_escape(result.get('stop_reason', ''))}); "
            f"mean |cos(m_c, m_s)| {result.get('similarity_before', 0):.3f} &rarr; {result.get('similarity_after', 0):.3f}"
        )
        if move:
            lines.append(
                "Mergers moved from 1 by {:.3f} (subject) and {:.3f} (style) on average; "
                "{:.1%} / {:.1%} of them are now below 0.1".format(
                    move.get("mean_abs_change_content", 0.0), move.get("mean_abs_change_style", 0.0),
                    move.get("share_below_0_1_content", 0.0), move.get("share_below_0_1_style", 0.0),
                )
            )  # fmt: skip
        if result.get("forms"):
            lines.append("Patched layers: " + ", ".join(f"{_escape(k)} {v}" for k, v in sorted(result["forms"].items())))
    if result.get("svd_relative_error"):
        lines.append(f"SVD relative error {result['svd_relative_error']:.3g}")
    if seconds is not None:
        lines.append(f"Took {seconds:.1f} s")
    for note in result.get("notes") or []:
        lines.append(f"Note: {_escape(note)}")
    return '<div class="ziplora-msg ziplora-msg-ok">' + "<br>".join(lines) + "</div>"
