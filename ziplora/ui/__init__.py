"""The ZipLoRA gradio tab: one face over ``MergeService``, the same in A1111 (gradio 3.41), Forge (gradio 4.x) and
alone on the toy model (``python -m ziplora ui``).

Only this package imports gradio, and only inside functions, so the core stays importable without it.

    compat.py      what differs between gradio 3 and 4 (the JS hook keyword, file values)
    controls.py    the request's declared fields as controls, and the form's values back as a request
    layout.py      build_tab: the components and their events
    handlers.py    TabHandlers: what each event does, as plain Python (tests call it without a browser)
    messages.py    the status and result boxes' HTML
    plots.py       the loss and per-layer overlap plots
    prompts.py     the preview's combined prompt and the suggested output name
    standalone.py  python -m ziplora ui
"""

from __future__ import annotations

from ziplora.ui.compat import gradio_major
from ziplora.ui.controls import INPUT_CHOICES, ZIP_FIELDS
from ziplora.ui.handlers import ZIP_OUTPUTS, TabHandlers
from ziplora.ui.layout import build_tab
from ziplora.ui.prompts import combine_prompts
from ziplora.ui.standalone import launch_standalone, make_app, standalone_host

__all__ = [
    "build_tab",
    "launch_standalone",
    "make_app",
    "standalone_host",
    "TabHandlers",
    "combine_prompts",
    "gradio_major",
    "INPUT_CHOICES",
    "ZIP_FIELDS",
    "ZIP_OUTPUTS",
]
