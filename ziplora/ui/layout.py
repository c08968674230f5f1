"""The tab's layout and wiring: ``build_tab`` lays out the components and connects their events to ``TabHandlers``.

Only APIs common to gradio 3.41 and 4.x (``gr.update``, ``elem_id``/``visible`` on rows, columns and accordions,
no ``gr.Box``); the one difference, the browser-hook keyword, comes from ``compat.js_kwargs``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ziplora.ui.compat import api_kwargs, js_kwargs
from ziplora.ui.controls import PLACED, control, tab_name, tab_options, zip_fields
from ziplora.ui.handlers import ZIP_OUTPUTS, TabHandlers

if TYPE_CHECKING:  # pragma: no cover - typing only; gradio is imported lazily
    import gradio as gr  # type: ignore[import-untyped]

    from ziplora.service import MergeService

__all__ = ["build_tab", "read_css", "offline_theme"]

ADVANCED_PER_ROW = 4

_COPY_JS = """(tag) => {
  const text = String(tag || "");
  if (typeof ziplora_copy_tag === "function") { ziplora_copy_tag(text); return []; }
  const fallback = () => {
    const area = document.createElement("textarea");
    area.value = text; area.setAttribute("readonly", ""); area.style.position = "fixed"; area.style.opacity = "0";
    document.body.appendChild(area); area.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing more to try */ }
    document.body.removeChild(area);
  };
  if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(text).catch(fallback); } else { fallback(); }
  return [];
}"""

_SEND_JS = """(tag) => {
  if (typeof ziplora_send_to_txt2img === "function") { ziplora_send_to_txt2img(String(tag || "")); }
  return [];
}"""


class _Wiring:
    """The tab's components by short name and its events, kept so tests can fire them without a browser."""

    def __init__(self, handlers: TabHandlers) -> None:
        self.handlers = handlers
        self.components: dict[str, Any] = {}
        self.events: list[tuple[str, str, Callable[..., Any] | None, list[str], list[str]]] = []
        self.fields = {tab_name(o): o for o in tab_options()}

    def add(self, name: str, component: Any) -> Any:
        self.components[name] = component
        return component

    def field(self, name: str, **kw: Any) -> Any:
        """The declared field shown under ``name``, as its generated control."""
        return self.add(name, control(self.fields[name], **kw))

    def on(self, trigger: str, event: str, fn: Callable[..., Any] | None, inputs: list[str], outputs: list[str], **kw: Any) -> None:
        listener = getattr(self.components[trigger], event)
        listener(
            fn,
            inputs=[self.components[n] for n in inputs],
            outputs=[self.components[n] for n in outputs],
            **api_kwargs(),
            **kw,
        )
        self.events.append((trigger, event, fn, list(inputs), list(outputs)))


def _pickers(w: _Wiring, choices: list[str]) -> None:
    import gradio as gr

    with gr.Row(elem_id="ziplora-pickers"):
        for name, label in (("subject", "Subject LoRA"), ("style", "Style LoRA")):
            with gr.Column(scale=5, min_width=240):
                w.add(name, gr.Dropdown(choices=choices, value=None, label=label, elem_id=f"ziplora-{name}", interactive=True))
                w.add(f"{name}_summary", gr.HTML("", elem_id=f"ziplora-{name}-summary"))
        with gr.Column(scale=1, min_width=100):
            w.add("refresh", gr.Button("Refresh", elem_id="ziplora-refresh", size="sm"))
    with gr.Row(elem_id="ziplora-prompts"):
        for name, label in (("subject_prompt", "Subject prompt"), ("style_prompt", "Style prompt")):
            what = name.split("_")[0]
            w.add(
                name,
                gr.Textbox(label=label, placeholder=f"from the {what} LoRA's trigger words", elem_id=f"ziplora-{what}-prompt", lines=1),
            )
    w.field("inputs", label="Training inputs", info=None)
    with gr.Row(visible=False, elem_id="ziplora-images") as images_row:
        w.add("images_row", images_row)
        w.field("subject_images", label="Subject images (1-10)")
        w.add("style_image", gr.File(file_count="single", file_types=["image"], label="Style image (1)", elem_id="ziplora-style-image"))


def _advanced(w: _Wiring) -> None:
    """Every declared field the layout does not place itself, in declaration order, a few per row."""
    import gradio as gr

    names = [tab_name(o) for o in tab_options() if o.name not in PLACED]
    with gr.Accordion("Advanced", open=False, elem_id="ziplora-advanced"):
        for start in range(0, len(names), ADVANCED_PER_ROW):
            with gr.Row():
                for name in names[start : start + ADVANCED_PER_ROW]:
                    w.field(name)


def _output_row(w: _Wiring) -> None:
    import gradio as gr

    with gr.Row(elem_id="ziplora-output"):
        w.add("output_name", gr.Textbox(label="Output name", placeholder="file name, without folders", elem_id="ziplora-output-name"))
        for name in ("content_weight", "style_multiplier", "target_rank", "overwrite"):
            w.field(name, info=None)
    with gr.Row(elem_id="ziplora-actions"):
        w.add("zip", gr.Button("Zip", variant="primary", elem_id="ziplora-zip"))
        w.add("interrupt", gr.Button("Interrupt", variant="stop", elem_id="ziplora-interrupt"))
    w.add("status", gr.HTML("", elem_id="ziplora-status"))
    w.add("loss_plot", gr.Plot(label="Losses", elem_id="ziplora-loss-plot"))


def _result_box(w: _Wiring, standalone: bool) -> None:
    import gradio as gr

    with gr.Column(visible=False, elem_id="ziplora-result-box") as result_box:
        w.add("result_box", result_box)
        w.add("result", gr.HTML("", elem_id="ziplora-result"))
        w.add(
            "similarity_plot",
            gr.Plot(label="Overlap of the two LoRAs per layer (|cos| of their deltas)", elem_id="ziplora-similarity-plot"),
        )
        with gr.Row(elem_id="ziplora-tag-row"):
            w.add("tag", gr.Textbox(label="Use in your prompt", elem_id="ziplora-tag", lines=1, scale=4))
            w.add("copy", gr.Button("Copy", elem_id="ziplora-copy", size="sm", scale=1))
            w.add("send", gr.Button("Send to txt2img", elem_id="ziplora-send", size="sm", scale=1, visible=not standalone))
        with gr.Row(elem_id="ziplora-reexport-row"):
            w.add("reexport", gr.Button("Write again with this style multiplier", elem_id="ziplora-reexport"))
        with gr.Row(elem_id="ziplora-preview-row"):
            w.add("both_prompt", gr.Textbox(label="Preview prompt (subject in style)", elem_id="ziplora-both-prompt", lines=1, scale=4))
            w.add("preview_seed", gr.Number(value=0, precision=0, label="Preview seed", elem_id="ziplora-preview-seed", scale=1))
            w.add("preview", gr.Button("Preview", elem_id="ziplora-preview", scale=1))
        w.add("preview_image", gr.Image(label="Preview: rows subject, style, direct, ZipLoRA; columns both, subject, style prompts",
                                        type="numpy", interactive=False, height=480, elem_id="ziplora-preview-image"))  # fmt: skip
    w.add("state", gr.State({}))


def _wire(w: _Wiring, standalone: bool) -> None:
    h = w.handlers
    quick = {"queue": False}
    silent = {"queue": False, "show_progress": "hidden"}  # follow-up updates: no spinner over the fields
    hidden_progress = {"show_progress": "hidden"}
    w.on("refresh", "click", h.refresh, ["subject", "style"], ["subject", "style"], **quick)
    for which in ("subject", "style"):
        w.on(which, "change", h.summary, [which], [f"{which}_summary"], **silent)
        w.on(
            which,
            "change",
            h.fill_prompts,
            ["subject", "style", "output_name"],
            ["subject_prompt", "style_prompt", "output_name"],
            **silent,
        )
    for which in ("subject_prompt", "style_prompt"):
        w.on(which, "change", h.both_prompt, ["subject_prompt", "style_prompt"], ["both_prompt"], **silent)
    w.on("inputs", "change", h.toggle_inputs, ["inputs"], ["images_row"], **silent)
    w.on("zip", "click", h.zip, list(zip_fields()), list(ZIP_OUTPUTS), **hidden_progress)
    w.on("interrupt", "click", h.interrupt, [], ["status"], **quick)
    w.on("reexport", "click", h.reexport, ["state", "style_multiplier"], ["status"], **hidden_progress)
    w.on("preview", "click", h.preview, ["state", "subject_prompt", "style_prompt", "both_prompt", "preview_seed"],
         ["status", "preview_image"], **hidden_progress)  # fmt: skip
    w.on("copy", "click", None, ["tag"], [], **quick, **js_kwargs(_COPY_JS))
    if not standalone:
        w.on("send", "click", None, ["tag"], [], **quick, **js_kwargs(_SEND_JS))


def build_tab(service: MergeService, *, standalone: bool = False) -> gr.Blocks:
    """The ZipLoRA tab over ``service``: mount it with ``on_ui_tabs`` (WebUI) or launch it alone.

    ``standalone`` hides what needs a WebUI (send to txt2img) and adds the page's own CSS and title.
    """
    import gradio as gr

    handlers = TabHandlers(service)
    w = _Wiring(handlers)
    blocks_kw: dict[str, Any] = {"analytics_enabled": False}
    if standalone:
        blocks_kw.update(title="ZipLoRA", css=read_css(), theme=offline_theme())
    with gr.Blocks(**blocks_kw) as blocks:
        if standalone:
            gr.Markdown("## ZipLoRA\nMerge a subject LoRA and a style LoRA (the bundled toy model).", elem_id="ziplora-title")
        _pickers(w, handlers.choices())
        _advanced(w)
        _output_row(w)
        _result_box(w, standalone)
        _wire(w, standalone)
    blocks.ziplora_wiring = w  # type: ignore[attr-defined]  # tests fire events through it
    return blocks


def read_css() -> str:
    """style.css from the extension root (the WebUI loads it itself; the standalone page needs it passed)."""
    path = Path(__file__).resolve().parents[2] / "style.css"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def offline_theme():  # type: ignore[no-untyped-def]
    """The default theme with system fonts: the standalone page must not fetch Google Fonts (offline use)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"])
