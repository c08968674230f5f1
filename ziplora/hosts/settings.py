"""Settings > ZipLoRA: the WebUI options of both hosts (AUTOMATIC1111 and Forge), declared and read here only.

``register_settings()`` adds them to the WebUI (the entry point, scripts/ziplora.py, calls it while it loads);
``read_settings()`` is how a host reads them, at each use, so a change in Settings applies to the next job
without a restart. Where they were never registered (tests, a script that builds a host by hand) the defaults
below apply. Every WebUI import happens inside a function.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ziplora.errors import HostError

__all__ = ["WebUISettings", "OPTION_DEFAULTS", "read_settings", "register_settings"]

SECTION = ("ziplora", "ZipLoRA")


@dataclass(frozen=True)
class WebUISettings:
    """What the options say, typed. Each field is one option, ``ziplora_<field>``."""

    resolution: int = 1024  # the session's default resolution: data-free sampling, SDXL size conditioning, preview size
    guidance: float = 5.0  # classifier-free guidance of the teachers' sampling and of the preview
    preview_steps: int = 20  # sampling steps of each A/B preview image
    save_previews: bool = False  # save preview images to the txt2img outputs folder like any generation


@dataclass(frozen=True)
class _Option:
    field: str
    label: str
    slider: dict[str, float] | None  # gradio slider bounds; None: the WebUI picks a component from the default's type

    @property
    def key(self) -> str:
        return f"ziplora_{self.field}"


_OPTIONS = (
    _Option("resolution", "Default merge resolution (data-free sampling and SDXL size conditioning)",
            {"minimum": 512, "maximum": 1536, "step": 64}),
    _Option("guidance", "Guidance (CFG) of the sampling that makes the merge's inputs and of the A/B preview",
            {"minimum": 1.0, "maximum": 15.0, "step": 0.5}),
    _Option("preview_steps", "Sampling steps of each A/B preview image", {"minimum": 4, "maximum": 60, "step": 1}),
    _Option("save_previews", "Save A/B preview images to the txt2img output folder", None),
)  # fmt: skip

_DEFAULTS = WebUISettings()
OPTION_DEFAULTS: dict[str, Any] = {o.key: getattr(_DEFAULTS, o.field) for o in _OPTIONS}
_TYPES = {f.name: type(getattr(_DEFAULTS, f.name)) for f in fields(WebUISettings)}


def read_settings(**overrides: Any) -> WebUISettings:
    """The options as they are now (``shared.opts``), each converted to its type; a keyword that is not None
    replaces its option (the tests drive the hosts on the 32-pixel toy model that way)."""
    try:
        from modules import shared

        opts = getattr(shared, "opts", None)
    except ImportError:  # no WebUI: the defaults
        opts = None
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        value = overrides.get(option.field)
        if value is None:
            value = getattr(opts, option.key, OPTION_DEFAULTS[option.key])
        values[option.field] = _typed(option, value)
    return WebUISettings(**values)


def _typed(option: _Option, value: Any) -> Any:
    kind = _TYPES[option.field]
    if kind is bool:
        return bool(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise HostError(f"Settings > ZipLoRA: {option.key} is {value!r}, not a number; set it again in the Settings tab") from None


def register_settings() -> None:
    """Add the options under Settings > ZipLoRA. ``options_templates`` works with --nowebui too (``on_ui_settings``
    does not); it is the same dict as ``shared.opts.data_labels``, so the keys resolve at once."""
    from modules import shared

    try:
        import gradio as gr

        slider: Any = gr.Slider
    except ImportError:  # a WebUI always has gradio; without it, the WebUI picks a component from the default's type
        slider = None
    section = {
        o.key: shared.OptionInfo(OPTION_DEFAULTS[o.key], o.label, slider, o.slider)
        if o.slider is not None
        else shared.OptionInfo(OPTION_DEFAULTS[o.key], o.label)
        for o in _OPTIONS
    }
    shared.options_templates.update(shared.options_section(SECTION, section))
