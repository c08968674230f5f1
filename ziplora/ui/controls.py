"""The request's declared fields as the tab's controls, and the form's values back as a request.

Every field of ``MergeRequest`` offered on the "tab" face is one control, named after the field (``TAB_NAMES``
keeps the user's words for the few the tab has always called so). The layout places the ``PLACED`` ones itself;
every other one is generated into the Advanced section by :func:`control`, so a newly declared field appears
there with its label, default and help, and reaches the request, without a change here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ziplora.errors import InvalidRequestError
from ziplora.request import MergeRequest, Option, options
from ziplora.ui.compat import file_paths

__all__ = [
    "TAB_NAMES",
    "PLACED",
    "INPUT_CHOICES",
    "ZIP_FIELDS",
    "tab_options",
    "tab_name",
    "elem_id",
    "control",
    "read_value",
    "request_from",
]

TAB_NAMES = {"content": "subject", "content_prompt": "subject_prompt", "content_images": "subject_images", "style_images": "style_image"}
# placed by the layout (pickers, prompts, images, the output row); the rest go to Advanced in declaration order
PLACED = (
    "content", "style", "content_prompt", "style_prompt", "inputs", "content_images", "style_images",
    "output_name", "content_weight", "style_multiplier", "target_rank", "overwrite",
)  # fmt: skip
ELEM_IDS = {"gradient_checkpointing": "ziplora-checkpointing"}  # kept: the e2e suite clicks it by this id
SLIDERS = {"style_multiplier": (0.0, 1.5, 0.05), "content_weight": (0.0, 2.0, 0.05), "samples": (1, 16, 1), "sampling_steps": (1, 100, 1)}
UNSET = {"target_rank": (0, "0: exact"), "resolution": (0, "0: the model's")}  # a number the tab shows for "not set"
CHOICE_LABELS = {"inputs": ("Data-free (each LoRA samples its own prompt)", "Reference images")}


REQUEST: type[MergeRequest] = MergeRequest  # the request the tab builds (a test swaps in one with a field more)


def tab_options() -> tuple[Option, ...]:
    return options(REQUEST, "tab")


def zip_fields() -> tuple[str, ...]:
    """What the Zip button sends, in this order: one control per field offered on the tab."""
    return tuple(tab_name(o) for o in tab_options())


def tab_name(spec: Option) -> str:
    return TAB_NAMES.get(spec.name, spec.name)


def elem_id(spec: Option) -> str:
    return ELEM_IDS.get(spec.name, "ziplora-" + tab_name(spec).replace("_", "-"))


def choice_labels(spec: Option) -> dict[str, str]:
    """The tab's word for each choice -> the value."""
    return dict(zip(CHOICE_LABELS.get(spec.name, spec.choices), spec.choices, strict=True))


INPUT_CHOICES = choice_labels(next(o for o in options(MergeRequest) if o.name == "inputs"))
ZIP_FIELDS = zip_fields()


def shown_default(spec: Option) -> Any:
    """What the control shows before the user touches it."""
    if spec.choices:
        return next(label for label, value in choice_labels(spec).items() if value == spec.default)
    if spec.default is None and spec.name in UNSET:
        return UNSET[spec.name][0]
    return spec.default


def form_defaults() -> dict[str, Any]:
    """The Zip button's values on a fresh tab, by ``ZIP_FIELDS`` name (the pickers empty)."""
    return {tab_name(o): shown_default(o) for o in tab_options()}


def _title(spec: Option) -> str:
    label = spec.label[:1].upper() + spec.label[1:]
    if spec.name in UNSET:
        return f"{label} ({UNSET[spec.name][1]})"
    return f"{label} (empty: not set)" if spec.optional else label


def control(spec: Option, **kw: Any) -> Any:
    """The gradio component for one declared field: its label, default, help (as ``info``) and element id."""
    import gradio as gr  # type: ignore[import-untyped]

    common: dict[str, Any] = {"label": _title(spec), "elem_id": elem_id(spec), "info": spec.help, **kw}
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.default, **common)
    if spec.choices:
        kind = gr.Radio if len(spec.choices) <= 3 else gr.Dropdown
        return kind(choices=list(choice_labels(spec)), value=shown_default(spec), **common)
    if spec.kind in ("int", "number"):
        if spec.name in SLIDERS:
            lo, hi, step = SLIDERS[spec.name]
            return gr.Slider(lo, hi, value=spec.default, step=step, **common)
        return gr.Number(value=shown_default(spec), precision=0 if spec.kind == "int" else None, **common)
    if spec.kind == "paths":
        return gr.File(file_count="multiple", file_types=["image"], **{k: v for k, v in common.items() if k != "info"})
    return gr.Textbox(value=spec.default, lines=1, **common)


def read_value(spec: Option, value: Any) -> Any:
    """A control's value as the request wants it; the checks of the declaration come after (same messages as
    the CLI and the API). A cleared number is "empty", a not-set one None, a choice's words its value."""
    if spec.kind in ("int", "number"):
        if value is None or value == "":
            if spec.optional:
                return None
            raise InvalidRequestError(f"{spec.label} is empty")
        if spec.name in UNSET and value == UNSET[spec.name][0]:
            return None
        if spec.kind == "int" and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        return value
    if spec.kind == "bool":
        return bool(value)
    if spec.kind == "paths":
        return file_paths(value)
    if spec.choices:
        return choice_labels(spec).get(value, value)
    return (value or "").strip() if spec.name.endswith("_prompt") else (value or "")


def request_from(values: dict[str, Any], pick: Callable[[Any, str], str]) -> MergeRequest:
    """A validated request from the Zip button's values (by ``ZIP_FIELDS`` name); ``pick(label, what)`` turns a
    picker's label into the LoRA's file (or raises the one-line reason)."""
    fields: dict[str, Any] = {"content": pick(values["subject"], "subject"), "style": pick(values["style"], "style")}
    for spec in tab_options():
        if spec.name not in fields:
            fields[spec.name] = read_value(spec, values[tab_name(spec)])
    if fields["inputs"] != "images":  # images uploaded, then switched back to data-free: not part of this request
        fields.update(content_images=(), style_images=())
    return REQUEST(**fields).validated()
