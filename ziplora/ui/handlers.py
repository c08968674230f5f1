"""What each of the tab's events does, as plain Python over one ``MergeService`` (tests call it without a browser).

Outputs are values or ``gr.update(...)`` dicts in the order ``layout.build_tab`` wires them; generators poll a
background job. Errors never escape: they come back as one line in the status box.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ziplora.errors import InvalidRequestError
from ziplora.lora_names import lora_names
from ziplora.request import MergeRequest, ReexportRequest, options
from ziplora.ui import plots
from ziplora.ui.controls import INPUT_CHOICES, read_value, request_from, zip_fields
from ziplora.ui.messages import error_html, message, progress_html, result_html
from ziplora.ui.prompts import AUTO_NAME_SUFFIX, combine_prompts, suggest_name

if TYPE_CHECKING:  # pragma: no cover
    from ziplora.service import MergeService

__all__ = ["TabHandlers", "ZIP_OUTPUTS", "POLL_SECONDS"]

POLL_SECONDS = 0.5  # how often a running job is asked for progress (tests lower it)
ZIP_OUTPUTS = ("status", "loss_plot", "result", "similarity_plot", "tag", "result_box", "state", "preview_image")


class TabHandlers:
    """Everything the tab's events do, as plain Python over one ``MergeService``.

    Outputs are values or ``gr.update(...)`` dicts in the order ``build_tab`` wires them; generators poll a
    background job. Errors never escape: they come back as one line in the status box.
    """

    def __init__(self, service: MergeService) -> None:
        self.service = service

    # pickers -----------------------------------------------------------------------------------------------
    def _labelled(self) -> dict[str, Path]:
        """Picker label -> file: the name that selects it anywhere (its stem; ``sub/name`` where stems repeat)."""
        return lora_names(self.service.host)

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
        import gradio as gr  # type: ignore[import-untyped]

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
            return message(lora.summary().one_line(), "ok")
        except Exception as err:  # noqa: BLE001 - a bad file is reported, never raised into gradio
            return error_html(err)

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
        new_name = suggest_name(subject, style) if (not name.strip() or name.endswith(AUTO_NAME_SUFFIX)) else keep
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
        picked: dict[str, Path] = {}

        def pick(label: Any, what: str) -> str:
            picked[what] = self.resolve(label, what)
            return str(picked[what])

        request = request_from(values, pick)
        return request, picked["subject"], picked["style"]

    def zip(self, *values: Any) -> Iterator[tuple[Any, ...]]:
        """Submit the merge, then poll it: yields (status, loss plot, result, similarity plot, tag, result
        column, state, preview image) until the job is no longer running."""
        import gradio as gr

        same = gr.update()
        hidden = gr.update(visible=False)
        try:
            request, subject, style = self.build_request(dict(zip(zip_fields(), values, strict=True)))
            job = self.service.submit_merge(request)
        except Exception as err:  # noqa: BLE001 - bad requests are shown, nothing is written
            yield error_html(err), same, same, same, same, same, same, same
            return
        started = time.monotonic()
        yield message("Starting the merge..."), plots.loss_figure([]), "", None, "", hidden, {}, None
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
                    plot = plots.loss_figure(data["losses"])
                yield progress_html(data), plot, same, same, same, same, same, same
                time.sleep(POLL_SECONDS)
            data = status.to_dict()
            plot = plots.loss_figure(data["losses"]) if data["losses"] else same
            if status.state != "done":
                kind = "interrupted: nothing was written" if status.state == "interrupted" else "failed"
                text = status.error or kind
                if status.state == "interrupted" and "nothing was written" not in text:
                    text = f"{text}; nothing was written"
                yield message(text, "error"), plot, same, same, same, same, {}, same
                return
            outcome = self.service.result(job)
            result = data["result"] or {}
            sim_plot = plots.similarity_figure(outcome.zip.overlap_before, outcome.zip.overlap_after) if outcome.zip is not None else None
            state = {"file": str(outcome.path), "subject": str(subject), "style": str(style)}
            yield (
                message(f"Done: {outcome.path.name}", "ok"),
                plot,
                result_html(result, time.monotonic() - started),
                sim_plot,
                outcome.tag,
                gr.update(visible=True),
                state,
                same,
            )
        except Exception as err:  # noqa: BLE001
            yield error_html(err), same, same, same, same, same, same, same

    def interrupt(self) -> Any:
        """Ask the running job to stop; the polling Zip (or preview) reports how it ended."""
        import gradio as gr

        try:
            if self.service.running() is None or not self.service.interrupt():
                return message("Nothing is running.")
        except Exception as err:  # noqa: BLE001
            return error_html(err)
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
            spec = next(o for o in options(ReexportRequest) if o.name == "style_multiplier")
            wanted = ReexportRequest(str(path), read_value(spec, style_multiplier)).validated()
            done = self.service.reexport(Path(wanted.name), wanted.style_multiplier)
            return message(f"Rewrote {path.name} with style multiplier {style_multiplier:g} in {done['seconds']:.2f} s", "ok")
        except Exception as err:  # noqa: BLE001
            return error_html(err)

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
            if seed is None or seed == "":
                raise InvalidRequestError("preview seed is empty")
            seed = int(seed) if isinstance(seed, float) and seed.is_integer() else seed
            if not isinstance(seed, int) or seed < 0:
                raise InvalidRequestError(f"the preview seed must be a whole number >= 0, got {seed!r}")
            spec = PreviewSpec(Path(state["subject"]), Path(state["style"]), path, prompts[0], prompts[1], prompts[2], seed)
            job = self.service.submit_preview(spec)
        except Exception as err:  # noqa: BLE001
            yield error_html(err), same
            return
        try:
            yield message("Rendering the preview..."), same
            while True:
                status = self.service.status(job)
                if status.state != "running":
                    break
                yield progress_html(status.to_dict()), same
                time.sleep(POLL_SECONDS)
            if status.state != "done":
                yield message(status.error or status.state, "error"), same
                return
            grid = self.service.result(job)
            caption = f"Rows: {', '.join(grid.rows)}. Columns: {', '.join(grid.columns)}. Seed {seed}."
            yield message(caption, "ok"), grid.image
        except Exception as err:  # noqa: BLE001
            yield error_html(err), same
