"""Words the tab fills in for the user: the preview's "subject in style" prompt and a default output name."""

from __future__ import annotations

import re
from pathlib import Path

from ziplora.errors import InvalidRequestError
from ziplora.request import check_output_name

__all__ = ["combine_prompts", "suggest_name", "AUTO_NAME_SUFFIX"]

AUTO_NAME_SUFFIX = "-ziplora"


def combine_prompts(subject_prompt: str, style_prompt: str) -> str:
    """A "subject in style" prompt from the two concept prompts, for the preview's first column.

    "a sks shape" + "a shape in zwx style" -> "a sks shape in zwx style"; "sks dog" + "a picture, zwx style"
    -> "sks dog, zwx style"; otherwise the two joined with a comma. The user can edit the result.
    """
    subject = " ".join(str(subject_prompt or "").split()).rstrip(" ,")
    style = " ".join(str(style_prompt or "").split()).strip(" ,")
    if not subject:
        return style
    if not style:
        return subject
    # "<short noun phrase> in <style>": keep the style's tail, our subject replaces its noun phrase
    m = re.match(r"^((?:[\w'-]+\s+){0,3}[\w'-]+)\s+(in\s+.+)$", style, re.IGNORECASE)
    if m and "," not in m.group(1):
        return f"{subject} {m.group(2)}"
    # "<short noun phrase>, <style words>": the same, comma-separated
    head, sep, tail = style.partition(",")
    if sep and tail.strip() and len(head.split()) <= 4:
        return f"{subject}, {tail.strip()}"
    return f"{subject}, {style}"


def suggest_name(subject: str, style: str) -> str:
    """A default output name from the two picks; falls back to "ziplora" when theirs would not be valid."""
    stem = lambda label: Path(label).name  # noqa: E731 - a label may carry a subfolder
    try:
        return check_output_name(f"{stem(subject)}+{stem(style)}{AUTO_NAME_SUFFIX}"[:100])
    except InvalidRequestError:
        return "ziplora"
