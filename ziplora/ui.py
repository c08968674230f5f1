"""The ZipLoRA gradio tab: one face over ``MergeService``, the same in A1111 (gradio 3.41), Forge (gradio 4.x)
and alone on the toy model (``python -m ziplora ui``).

Only this module of the package imports gradio, and only inside functions, so the core stays importable
without it. Handlers live in :class:`TabHandlers` as plain methods (tests call them without a browser);
``build_tab`` only lays out components and wires events, using APIs common to both gradio versions
(``gr.update``, ``_js``/``js`` chosen in one helper, no ``gr.Box``).
"""

from __future__ import annotations

import html
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ziplora.errors import HostError, InvalidRequestError, ZipLoraError
from ziplora.request import PRECISIONS, MergeRequest, check_output_name

if TYPE_CHECKING:  # pragma: no cover - typing only; gradio is imported lazily
    import gradio as gr

    from ziplora.hosts.base import Host
    from ziplora.service import MergeService

log = logging.getLogger(__name__)

__all__ = ["build_tab", "launch_standalone", "TabHandlers", "combine_prompts", "gradio_major"]

POLL_SECONDS = 0.5  # how often a running job is asked for progress (tests lower it)
DEFAULT_TOY_LORA_DIR = Path("~/.cache/sd-webui-ziplora/toy-loras")
STANDALONE_CONCURRENCY = 4  # a polled Zip, a preview, a refresh and an interrupt can all be in flight

INPUT_CHOICES = {
    "Data-free (each LoRA samples its own prompt)": "data-free",
    "Reference images": "images",
}
SIMILARITY_CHOICES = ("dot", "cos")
_AUTO_NAME_SUFFIX = "-ziplora"
ZIP_OUTPUTS = ("status", "loss_plot", "result", "similarity_plot", "tag", "result_box", "state", "preview_image")

# Fields the Zip button sends, in this order (the handler receives them positionally).
ZIP_FIELDS = (
    "subject", "style", "subject_prompt", "style_prompt", "inputs", "subject_images", "style_image",
    "steps", "lam", "lr", "resolution", "samples", "sampling_steps", "seed", "stop_similarity", "precision",
    "similarity", "gradient_checkpointing", "output_name", "style_multiplier", "target_rank", "overwrite",
)  # fmt: skip

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


# -- small helpers (no gradio) ------------------------------------------------------------------------------
def gradio_major() -> int:
    """gradio's major version: 3 in A1111 (3.41.2), 4 in Forge (4.40.0)."""
    import gradio as gr

    return int(str(gr.__version__).split(".")[0])


def _js_kwargs(code: str) -> dict[str, str]:
    """The keyword for a browser-side hook: ``_js`` on gradio 3, ``js`` on gradio 4 and later."""
    return {"js": code} if gradio_major() >= 4 else {"_js": code}


def _api_kwargs() -> dict[str, Any]:
    """Keep the tab's events out of the WebUI's API (the project has its own route). gradio 4's browser client
    logs "Too many arguments provided for the endpoint" for such events; that is noise, not a failure."""
    return {"api_name": False}


def _escape(text: object) -> str:
    return html.escape(str(text), quote=False)


def _one_line(text: object, limit: int = 500) -> str:
    return " ".join(str(text).split())[:limit]


def _message(text: str, kind: str = "info") -> str:
    """Status HTML: one escaped line in a styled box (kind: info, ok, error)."""
    return f'<div class="ziplora-msg ziplora-msg-{kind}">{_escape(text)}</div>'


def _error_html(err: BaseException) -> str:
    """A readable one-line message for any failure; the traceback goes to the log, never to the page."""
    if isinstance(err, ZipLoraError):
        return _message(str(err), "error")
    log.exception("ZipLoRA tab: unexpected error")
    return _message(f"internal error: {type(err).__name__}: {_one_line(err)}", "error")


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


def _suggest_name(subject: str, style: str) -> str:
    """A default output name from the two picks; falls back to "ziplora" when theirs would not be valid."""
    stem = lambda label: Path(label).name  # noqa: E731 - a label may carry a subfolder
    try:
        return check_output_name(f"{stem(subject)}+{stem(style)}{_AUTO_NAME_SUFFIX}"[:100])
    except InvalidRequestError:
        return "ziplora"


def _file_paths(value: Any) -> tuple[str, ...]:
    """Paths from a gr.File value: gradio 4 gives str paths, gradio 3 tempfile objects (``.name``)."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, (str, Path)):
            out.append(str(item))
        elif isinstance(item, dict) and (item.get("path") or item.get("name")):
            out.append(str(item.get("path") or item.get("name")))
        elif getattr(item, "name", None):
            out.append(str(item.name))
    return tuple(out)


def _int_or_none(value: Any, name: str) -> int | None:
    """0 or empty means "not set" (host default resolution, no target rank)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not float(value).is_integer():
        raise InvalidRequestError(f"{name} must be a whole number, got {value!r}")
    return None if int(value) == 0 else int(value)


def _number(value: Any, name: str, integer: bool = False) -> Any:
    """Numbers as the request wants them; a cleared field becomes a clear error, not a crash."""
    if value is None or value == "":
        raise InvalidRequestError(f"{name} is empty")
    if integer and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# -- plots (matplotlib without pyplot: thread-safe, works the same on gradio 3 and 4) -----------------------
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


def _progress_html(data: dict[str, Any]) -> str:
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


def _result_html(result: dict[str, Any], seconds: float | None) -> str:
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


# -- the handlers ---------------------------------------------------------------------------------------------
class TabHandlers:
    """Everything the tab's events do, as plain Python over one ``MergeService``.

    Outputs are values or ``gr.update(...)`` dicts in the order ``build_tab`` wires them; generators poll a
    background job. Errors never escape: they come back as one line in the status box.
    """

    def __init__(self, service: MergeService) -> None:
        self.service = service

    # pickers -----------------------------------------------------------------------------------------------
    def _labelled(self) -> dict[str, Path]:
        """Picker label -> file: the path below the LoRA folder without ``.safetensors`` (as the WebUI names them)."""
        host = self.service.host
        root = Path(host.lora_dir())
        out: dict[str, Path] = {}
        for path in host.list_loras():
            try:
                label = path.relative_to(root).with_suffix("").as_posix()
            except ValueError:  # a second folder (A1111's LyCORIS dir): the full path is unambiguous
                label = str(path)
            out.setdefault(label, path)
        return out

    def choices(self) -> list[str]:
        return list(self._labelled())

    def resolve(self, label: str | None, what: str) -> Path:
        """The file behind a picker label; a vanished file is a readable error."""
        if not label:
            raise InvalidRequestError(f"pick a {what} LoRA")
        path = self._labelled().get(label)
        if path is None:
            raise InvalidRequestError(f"{label}: no such LoRA in {self.service.host.lora_dir()} any more; press Refresh")
        return path

    def refresh(self, subject: str | None, style: str | None) -> tuple[Any, Any]:
        """Rescan the folder; keep each pick if its file is still there."""
        import gradio as gr

        choices = self.choices()
        keep = lambda v: v if v in choices else None  # noqa: E731
        return gr.update(choices=choices, value=keep(subject)), gr.update(choices=choices, value=keep(style))

    def summary(self, label: str | None) -> str:
        """Kind, rank, layer counts, base model check and trigger words of a pick, or its one-line error."""
        if not label:
            return ""
        try:
            from ziplora.formats import open_lora

            lora = open_lora(self.resolve(label, "LoRA"), expect=self.service.host.families)
            return _message(lora.summary().one_line(), "ok")
        except Exception as err:  # noqa: BLE001 - a bad file is reported, never raised into gradio
            return _error_html(err)

    def fill_prompts(self, subject: str | None, style: str | None, output_name: str) -> tuple[Any, Any, Any]:
        """Prompts from the trigger words once both picks are readable (editable afterwards), and a name."""
        import gradio as gr

        keep = gr.update()
        if not subject or not style:
            return keep, keep, keep
        try:
            from ziplora.formats import open_lora
            from ziplora.jobs import default_prompts

            host = self.service.host
            content = open_lora(self.resolve(subject, "subject"), expect=host.families)
            style_file = open_lora(self.resolve(style, "style"), expect=host.families)
            subject_prompt, style_prompt = default_prompts(host, content, style_file)
        except Exception:  # noqa: BLE001 - the summaries already show why; leave the prompts alone
            return keep, keep, keep
        name = output_name or ""
        new_name = _suggest_name(subject, style) if (not name.strip() or name.endswith(_AUTO_NAME_SUFFIX)) else keep
        return subject_prompt, style_prompt, new_name

    @staticmethod
    def both_prompt(subject_prompt: str, style_prompt: str) -> str:
        return combine_prompts(subject_prompt, style_prompt)

    @staticmethod
    def toggle_inputs(choice: str) -> Any:
        import gradio as gr

        return gr.update(visible=INPUT_CHOICES.get(choice, "data-free") == "images")

    # the merge ----------------------------------------------------------------------------------------------
    def build_request(self, values: dict[str, Any]) -> tuple[MergeRequest, Path, Path]:
        """A validated request from the form's values (raises ``ZipLoraError`` with one line)."""
        subject = self.resolve(values["subject"], "subject")
        style = self.resolve(values["style"], "style")
        inputs = INPUT_CHOICES.get(values["inputs"], values["inputs"])
        request = MergeRequest(
            content=str(subject),
            style=str(style),
            output_name=values["output_name"] or "",
            content_prompt=(values["subject_prompt"] or "").strip(),
            style_prompt=(values["style_prompt"] or "").strip(),
            style_multiplier=_number(values["style_multiplier"], "style multiplier"),
            target_rank=_int_or_none(values["target_rank"], "target rank"),
            overwrite=bool(values["overwrite"]),
            steps=_number(values["steps"], "steps", integer=True),
            lam=_number(values["lam"], "lambda"),
            lr=_number(values["lr"], "learning rate"),
            similarity=values["similarity"],
            stop_similarity=_number(values["stop_similarity"], "similarity stop threshold"),
            resolution=_int_or_none(values["resolution"], "resolution"),
            samples=_number(values["samples"], "samples per concept", integer=True),
            sampling_steps=_number(values["sampling_steps"], "sampling steps", integer=True),
            seed=_number(values["seed"], "seed", integer=True),
            precision=values["precision"],
            gradient_checkpointing=bool(values["gradient_checkpointing"]),
            inputs=inputs,
            content_images=_file_paths(values["subject_images"]) if inputs == "images" else (),
            style_images=_file_paths(values["style_image"]) if inputs == "images" else (),
        )
        return request.validated(), subject, style

    def zip(self, *values: Any) -> Iterator[tuple[Any, ...]]:
        """Submit the merge, then poll it: yields (status, loss plot, result, similarity plot, tag, result
        column, state, preview image) until the job is no longer running."""
        import gradio as gr

        same = gr.update()
        hidden = gr.update(visible=False)
        try:
            request, subject, style = self.build_request(dict(zip(ZIP_FIELDS, values, strict=True)))
            job = self.service.submit_merge(request)
        except Exception as err:  # noqa: BLE001 - bad requests are shown, nothing is written
            yield _error_html(err), same, same, same, same, same, same, same
            return
        started = time.monotonic()
        yield _message("Starting the merge..."), loss_figure([]), "", None, "", hidden, {}, None
        shown = -1
        try:
            while True:
                status = self.service.status(job)
                if status.state != "running":
                    break
                data = status.to_dict()
                plot = same
                if len(data["losses"]) != shown:
                    shown = len(data["losses"])
                    plot = loss_figure(data["losses"])
                yield _progress_html(data), plot, same, same, same, same, same, same
                time.sleep(POLL_SECONDS)
            data = status.to_dict()
            plot = loss_figure(data["losses"]) if data["losses"] else same
            if status.state != "done":
                kind = "interrupted: nothing was written" if status.state == "interrupted" else "failed"
                text = status.error or kind
                if status.state == "interrupted" and "nothing was written" not in text:
                    text = f"{text}; nothing was written"
                yield _message(text, "error"), plot, same, same, same, same, {}, same
                return
            outcome = self.service.result(job)
            result = data["result"] or {}
            sim_plot = similarity_figure(outcome.zip.overlap_before, outcome.zip.overlap_after) if outcome.zip is not None else None
            state = {"file": str(outcome.path), "subject": str(subject), "style": str(style)}
            yield (
                _message(f"Done: {outcome.path.name}", "ok"),
                plot,
                _result_html(result, time.monotonic() - started),
                sim_plot,
                outcome.tag,
                gr.update(visible=True),
                state,
                same,
            )
        except Exception as err:  # noqa: BLE001
            yield _error_html(err), same, same, same, same, same, same, same

    def interrupt(self) -> Any:
        """Ask the running job to stop; the polling Zip (or preview) reports how it ended."""
        import gradio as gr

        try:
            if self.service.running() is None or not self.service.interrupt():
                return _message("Nothing is running.")
        except Exception as err:  # noqa: BLE001
            return _error_html(err)
        return gr.update()

    # after the merge ----------------------------------------------------------------------------------------
    @staticmethod
    def _merged_file(state: dict[str, Any] | None) -> Path:
        if not state or not state.get("file"):
            raise InvalidRequestError("zip two LoRAs first")
        return Path(state["file"])

    def reexport(self, state: dict[str, Any] | None, style_multiplier: float) -> str:
        """Rewrite the merged file from its saved mergers with a new style multiplier (seconds)."""
        try:
            path = self._merged_file(state)
            done = self.service.reexport(path, _number(style_multiplier, "style multiplier"))
            return _message(f"Rewrote {path.name} with style multiplier {style_multiplier:g} in {done['seconds']:.2f} s", "ok")
        except Exception as err:  # noqa: BLE001
            return _error_html(err)

    def preview(
        self, state: dict[str, Any] | None, subject_prompt: str, style_prompt: str, both_prompt: str, seed: Any
    ) -> Iterator[tuple[Any, Any]]:
        """Render the A/B grid (subject alone, style alone, direct, ZipLoRA x three prompts) at one seed."""
        import gradio as gr

        from ziplora.preview import PreviewSpec

        same = gr.update()
        try:
            path = self._merged_file(state)
            assert state is not None
            prompts = [(p or "").strip() for p in (subject_prompt, style_prompt, both_prompt)]
            if not all(prompts):
                raise InvalidRequestError("fill in the subject, style and preview prompts")
            seed = _number(seed, "preview seed", integer=True)
            if not isinstance(seed, int) or seed < 0:
                raise InvalidRequestError(f"the preview seed must be a whole number >= 0, got {seed!r}")
            spec = PreviewSpec(Path(state["subject"]), Path(state["style"]), path, prompts[0], prompts[1], prompts[2], seed)
            job = self.service.submit_preview(spec)
        except Exception as err:  # noqa: BLE001
            yield _error_html(err), same
            return
        try:
            yield _message("Rendering the preview..."), same
            while True:
                status = self.service.status(job)
                if status.state != "running":
                    break
                yield _progress_html(status.to_dict()), same
                time.sleep(POLL_SECONDS)
            if status.state != "done":
                yield _message(status.error or status.state, "error"), same
                return
            grid = self.service.result(job)
            caption = f"Rows: {', '.join(grid.rows)}. Columns: {', '.join(grid.columns)}. Seed {seed}."
            yield _message(caption, "ok"), grid.image
        except Exception as err:  # noqa: BLE001
            yield _error_html(err), same


# -- layout and wiring ----------------------------------------------------------------------------------------
class _Wiring:
    """The tab's components by short name and its events, kept so tests can fire them without a browser."""

    def __init__(self, handlers: TabHandlers) -> None:
        self.handlers = handlers
        self.components: dict[str, Any] = {}
        self.events: list[tuple[str, str, Callable[..., Any] | None, list[str], list[str]]] = []

    def add(self, name: str, component: Any) -> Any:
        self.components[name] = component
        return component

    def on(self, trigger: str, event: str, fn: Callable[..., Any] | None, inputs: list[str], outputs: list[str], **kw: Any) -> None:
        listener = getattr(self.components[trigger], event)
        listener(
            fn,
            inputs=[self.components[n] for n in inputs],
            outputs=[self.components[n] for n in outputs],
            **_api_kwargs(),
            **kw,
        )
        self.events.append((trigger, event, fn, list(inputs), list(outputs)))


def build_tab(service: MergeService, *, standalone: bool = False) -> gr.Blocks:
    """The ZipLoRA tab over ``service``: mount it with ``on_ui_tabs`` (WebUI) or launch it alone.

    ``standalone`` hides what needs a WebUI (send to txt2img) and adds the page's own CSS and title.
    """
    import gradio as gr

    handlers = TabHandlers(service)
    w = _Wiring(handlers)
    add = w.add
    blocks_kw: dict[str, Any] = {"analytics_enabled": False}
    if standalone:
        blocks_kw.update(title="ZipLoRA", css=_read_css(), theme=_offline_theme())
    choices = handlers.choices()
    hidden_progress = {"show_progress": "hidden"}

    with gr.Blocks(**blocks_kw) as blocks:
        if standalone:
            gr.Markdown("## ZipLoRA\nMerge a subject LoRA and a style LoRA (the bundled toy model).", elem_id="ziplora-title")
        with gr.Row(elem_id="ziplora-pickers"):
            with gr.Column(scale=5, min_width=240):
                add("subject", gr.Dropdown(choices=choices, value=None, label="Subject LoRA", elem_id="ziplora-subject", interactive=True))
                add("subject_summary", gr.HTML("", elem_id="ziplora-subject-summary"))
            with gr.Column(scale=5, min_width=240):
                add("style", gr.Dropdown(choices=choices, value=None, label="Style LoRA", elem_id="ziplora-style", interactive=True))
                add("style_summary", gr.HTML("", elem_id="ziplora-style-summary"))
            with gr.Column(scale=1, min_width=100):
                add("refresh", gr.Button("Refresh", elem_id="ziplora-refresh", size="sm"))
        with gr.Row(elem_id="ziplora-prompts"):
            add("subject_prompt", gr.Textbox(label="Subject prompt", placeholder="from the subject LoRA's trigger words",
                                             elem_id="ziplora-subject-prompt", lines=1))  # fmt: skip
            add("style_prompt", gr.Textbox(label="Style prompt", placeholder="from the style LoRA's trigger words",
                                           elem_id="ziplora-style-prompt", lines=1))  # fmt: skip
        add("inputs", gr.Radio(choices=list(INPUT_CHOICES), value=next(iter(INPUT_CHOICES)), label="Training inputs",
                               elem_id="ziplora-inputs"))  # fmt: skip
        with gr.Row(visible=False, elem_id="ziplora-images") as images_row:
            add("images_row", images_row)
            add("subject_images", gr.File(file_count="multiple", file_types=["image"], label="Subject images (1-10)",
                                          elem_id="ziplora-subject-images"))  # fmt: skip
            add("style_image", gr.File(file_count="single", file_types=["image"], label="Style image (1)", elem_id="ziplora-style-image"))
        with gr.Accordion("Advanced", open=False, elem_id="ziplora-advanced"):
            with gr.Row():
                add("steps", gr.Number(value=100, precision=0, label="Steps (at most)", elem_id="ziplora-steps"))
                add("lam", gr.Number(value=0.01, label="λ (similarity weight)", elem_id="ziplora-lam"))
                add("lr", gr.Number(value=0.01, label="Learning rate (mergers)", elem_id="ziplora-lr"))
                add("stop_similarity", gr.Number(value=0.01, label="Stop when similarity is below", elem_id="ziplora-stop-similarity"))
            with gr.Row():
                add("resolution", gr.Number(value=0, precision=0, label="Resolution (0: the model's)", elem_id="ziplora-resolution"))
                add("samples", gr.Slider(1, 16, value=2, step=1, label="Samples per concept", elem_id="ziplora-samples"))
                add(
                    "sampling_steps",
                    gr.Slider(1, 100, value=20, step=1, label="Sampling steps (data-free)", elem_id="ziplora-sampling-steps"),
                )
                add("seed", gr.Number(value=0, precision=0, label="Seed", elem_id="ziplora-seed"))
            with gr.Row():
                add("precision", gr.Dropdown(choices=list(PRECISIONS), value="auto", label="Precision", elem_id="ziplora-precision"))
                add("similarity", gr.Radio(choices=list(SIMILARITY_CHOICES), value="dot", label="Similarity", elem_id="ziplora-similarity"))
                add("gradient_checkpointing", gr.Checkbox(value=False, label="Gradient checkpointing", elem_id="ziplora-checkpointing"))
        with gr.Row(elem_id="ziplora-output"):
            add("output_name", gr.Textbox(label="Output name", placeholder="file name, without folders", elem_id="ziplora-output-name"))
            add("style_multiplier", gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Style multiplier", elem_id="ziplora-style-multiplier"))
            add("target_rank", gr.Number(value=0, precision=0, label="Target rank (0: exact)", elem_id="ziplora-target-rank"))
            add("overwrite", gr.Checkbox(value=False, label="Overwrite", elem_id="ziplora-overwrite"))
        with gr.Row(elem_id="ziplora-actions"):
            add("zip", gr.Button("Zip", variant="primary", elem_id="ziplora-zip"))
            add("interrupt", gr.Button("Interrupt", variant="stop", elem_id="ziplora-interrupt"))
        add("status", gr.HTML("", elem_id="ziplora-status"))
        add("loss_plot", gr.Plot(label="Losses", elem_id="ziplora-loss-plot"))
        with gr.Column(visible=False, elem_id="ziplora-result-box") as result_box:
            add("result_box", result_box)
            add("result", gr.HTML("", elem_id="ziplora-result"))
            add(
                "similarity_plot",
                gr.Plot(label="Overlap of the two LoRAs per layer (|cos| of their deltas)", elem_id="ziplora-similarity-plot"),
            )
            with gr.Row(elem_id="ziplora-tag-row"):
                add("tag", gr.Textbox(label="Use in your prompt", elem_id="ziplora-tag", lines=1, scale=4))
                add("copy", gr.Button("Copy", elem_id="ziplora-copy", size="sm", scale=1))
                add("send", gr.Button("Send to txt2img", elem_id="ziplora-send", size="sm", scale=1, visible=not standalone))
            with gr.Row(elem_id="ziplora-reexport-row"):
                add("reexport", gr.Button("Write again with this style multiplier", elem_id="ziplora-reexport"))
            with gr.Row(elem_id="ziplora-preview-row"):
                add("both_prompt", gr.Textbox(label="Preview prompt (subject in style)", elem_id="ziplora-both-prompt", lines=1, scale=4))
                add("preview_seed", gr.Number(value=0, precision=0, label="Preview seed", elem_id="ziplora-preview-seed", scale=1))
                add("preview", gr.Button("Preview", elem_id="ziplora-preview", scale=1))
            add("preview_image", gr.Image(label="Preview: rows subject, style, direct, ZipLoRA; columns both, subject, style prompts",
                                          type="numpy", interactive=False, height=480, elem_id="ziplora-preview-image"))  # fmt: skip
        add("state", gr.State({}))

        quick = {"queue": False}
        silent = {"queue": False, "show_progress": "hidden"}  # follow-up updates: no spinner over the fields
        w.on("refresh", "click", handlers.refresh, ["subject", "style"], ["subject", "style"], **quick)
        for which in ("subject", "style"):
            w.on(which, "change", handlers.summary, [which], [f"{which}_summary"], **silent)
            w.on(which, "change", handlers.fill_prompts, ["subject", "style", "output_name"],
                 ["subject_prompt", "style_prompt", "output_name"], **silent)  # fmt: skip
        for which in ("subject_prompt", "style_prompt"):
            w.on(which, "change", handlers.both_prompt, ["subject_prompt", "style_prompt"], ["both_prompt"], **silent)
        w.on("inputs", "change", handlers.toggle_inputs, ["inputs"], ["images_row"], **silent)
        w.on("zip", "click", handlers.zip, list(ZIP_FIELDS),
             ZIP_OUTPUTS, **hidden_progress)  # fmt: skip
        w.on("interrupt", "click", handlers.interrupt, [], ["status"], **quick)
        w.on("reexport", "click", handlers.reexport, ["state", "style_multiplier"], ["status"], **hidden_progress)
        w.on("preview", "click", handlers.preview, ["state", "subject_prompt", "style_prompt", "both_prompt", "preview_seed"],
             ["status", "preview_image"], **hidden_progress)  # fmt: skip
        w.on("copy", "click", None, ["tag"], [], **quick, **_js_kwargs(_COPY_JS))
        if not standalone:
            w.on("send", "click", None, ["tag"], [], **quick, **_js_kwargs(_SEND_JS))

    blocks.ziplora_wiring = w  # type: ignore[attr-defined] - tests fire events through it
    return blocks


def _extension_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _read_css() -> str:
    """style.css from the extension root (the WebUI loads it itself; the standalone page needs it passed)."""
    path = _extension_root() / "style.css"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _offline_theme():  # type: ignore[no-untyped-def]
    """The default theme with system fonts: the standalone page must not fetch Google Fonts (offline use)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"])


# -- standalone -----------------------------------------------------------------------------------------------
def _make_app(service: MergeService) -> gr.Blocks:
    """The standalone page over ``service`` with the queue on, so Interrupt runs while a Zip is polled."""
    app = build_tab(service, standalone=True)
    if gradio_major() >= 4:
        app.queue(default_concurrency_limit=STANDALONE_CONCURRENCY)
    else:
        app.queue(concurrency_count=STANDALONE_CONCURRENCY)
    return app


def _standalone_host(lora_dir: str | None) -> Host:
    """The toy host over ``lora_dir`` (or the default cache folder), holding copies of the bundled LoRAs."""
    from ziplora.hosts.toy import ToyHost

    folder = Path(lora_dir).expanduser() if lora_dir else DEFAULT_TOY_LORA_DIR.expanduser()
    try:
        host = ToyHost.with_bundled_loras(folder)
        host.model  # noqa: B018 - load the bundled model now: a missing one fails at start, not at the first Zip
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("ziplora.toy.assets"):
            raise HostError("the bundled toy model is missing from this install (ziplora/toy/assets)") from None
        raise
    except FileNotFoundError as err:
        raise HostError(f"the bundled toy model is incomplete: {err}") from None
    return host


def launch_standalone(port: int, lora_dir: str | None) -> int:
    """``python -m ziplora ui``: the tab alone on the toy model, on 127.0.0.1 only; blocks until Ctrl-C."""
    import gradio  # noqa: F401 - a clear ImportError before anything loads

    from ziplora.service import MergeService

    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRequestError(f"--port must be between 1 and 65535, got {port!r}")
    host = _standalone_host(lora_dir)
    app = _make_app(MergeService(host))
    sys.stderr.write(f"ZipLoRA on the toy model: http://127.0.0.1:{port} (LoRAs in {host.lora_dir()}); Ctrl-C stops it\n")
    app.launch(server_name="127.0.0.1", server_port=port, share=False, inbrowser=False, show_api=False, quiet=True)
    return 0
