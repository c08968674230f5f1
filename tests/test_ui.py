"""The ZipLoRA tab on gradio 3.41 (A1111) and 4.x (Forge): built, then driven through its own wiring.

``Page`` fires an event the way gradio would: it reads the wired input components' current values, calls
the handler, applies each output (plain values or ``gr.update`` dicts) after running it through the output
component's ``postprocess`` (so a value gradio cannot show fails here), and follows ``change`` events.
"""

from __future__ import annotations

import inspect
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gradio

gr = pytest.importorskip("gradio")

from ziplora import ui  # noqa: E402
from ziplora.errors import BusyError  # noqa: E402
from ziplora.formats import open_lora  # noqa: E402
from ziplora.service import MergeService  # noqa: E402

FAST = {"steps": 5, "sampling_steps": 3, "samples": 1}


class Page:
    """One browser session's view of the tab, without a browser."""

    def __init__(self, blocks: Any) -> None:
        self.wiring = blocks.ziplora_wiring
        self.c = self.wiring.components
        self.values: dict[str, Any] = {name: getattr(comp, "value", None) for name, comp in self.c.items()}
        self.visible: dict[str, bool] = {name: getattr(comp, "visible", True) for name, comp in self.c.items()}
        self.choices: dict[str, list[str]] = {}
        self.yields: list[tuple[Any, ...]] = []

    def set(self, name: str, value: Any) -> None:
        """A user edit: the value changes and the component's change events fire."""
        self.values[name] = value
        self._changed(name, depth=0)

    def fire(self, trigger: str, event: str = "click", between: Any = None, depth: int = 0) -> None:
        """Run every handler wired to ``trigger.event``; ``between(page, output)`` runs after each yield."""
        for name, ev, fn, inputs, outputs in self.wiring.events:
            if name != trigger or ev != event or fn is None:
                continue
            result = fn(*[self.values[i] for i in inputs])
            if inspect.isgenerator(result):
                for item in result:
                    self._apply(outputs, item, depth)
                    self.yields.append(item)
                    if between is not None:
                        between(self, item)
            else:
                self._apply(outputs, result, depth)

    def _apply(self, outputs: list[str], result: Any, depth: int) -> None:
        items = (result,) if len(outputs) == 1 else tuple(result)
        assert len(items) == len(outputs), f"{len(items)} values for {len(outputs)} outputs"
        changed = []
        for name, value in zip(outputs, items, strict=True):
            comp = self.c[name]
            if isinstance(value, dict) and value.get("__type__") in ("update", "generic_update"):  # gradio 4 / 3
                if "visible" in value:
                    self.visible[name] = value["visible"]
                if "choices" in value:
                    self.choices[name] = list(value["choices"])
                if "value" not in value:
                    continue
                value = value["value"]
            if not isinstance(comp, (gr.State, gr.Row, gr.Column)):
                comp.postprocess(value)  # what gradio does before sending it to the browser
            if self.values.get(name) is not value:
                self.values[name] = value
                changed.append(name)
        for name in changed:
            self._changed(name, depth + 1)

    def _changed(self, name: str, depth: int) -> None:
        if depth < 4:
            self.fire(name, "change", depth=depth)

    def text(self, name: str) -> str:
        return str(self.values[name] or "")


@pytest.fixture(autouse=True)
def _fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui.handlers, "POLL_SECONDS", 0.02)


@pytest.fixture()
def service(toy_host) -> MergeService:  # type: ignore[no-untyped-def]
    return MergeService(toy_host)


@pytest.fixture()
def page(service: MergeService) -> Page:
    return Page(ui.build_tab(service))


def _pick(page: Page, **values: Any) -> None:
    page.set("subject", "subject")
    page.set("style", "style")
    for name, value in {**FAST, **values}.items():
        page.values[name] = value


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*")}


def test_tab_builds_with_prefixed_ids_on_this_gradio(service: MergeService) -> None:
    for standalone in (False, True):
        blocks = ui.build_tab(service, standalone=standalone)
        assert isinstance(blocks, gr.Blocks)
        ids = [b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)]
        assert len(ids) > 30 and all(i.startswith("ziplora-") for i in ids), [i for i in ids if not i.startswith("ziplora-")]
        assert len(ids) == len(set(ids))
        send = blocks.ziplora_wiring.components["send"]
        assert send.visible is (not standalone)
        js_events = [e for e in blocks.ziplora_wiring.events if e[2] is None]
        assert {e[0] for e in js_events} == ({"copy"} if standalone else {"copy", "send"})


def test_gradio_version_helper_picks_the_js_keyword() -> None:
    kw = ui.compat.js_kwargs("() => []")
    assert kw == ({"js": "() => []"} if int(gr.__version__.split(".")[0]) >= 4 else {"_js": "() => []"})


def test_pickers_list_loras_show_summaries_and_fill_prompts(page: Page, lora_dir: Path) -> None:
    assert page.c["subject"].choices  # listed at build time
    page.fire("refresh")
    assert page.choices["subject"] == page.choices["style"] == ["style", "subject"]
    page.set("subject", "subject")
    assert "rank 4" in page.text("subject_summary") and "sks shape" in page.text("subject_summary")
    assert "ToyXL" in page.text("subject_summary") and "UNet" in page.text("subject_summary")
    assert page.text("subject_prompt") == ""  # one pick: nothing to fill yet
    page.set("style", "style")
    assert "zwx style" in page.text("style_summary")
    assert page.text("subject_prompt") == "a sks shape"
    assert page.text("style_prompt") == "a shape in zwx style"
    assert page.text("both_prompt") == "a sks shape in zwx style"
    assert page.text("output_name") == "subject+style-ziplora"
    # the user's own name survives a new pick; an edited prompt updates the preview prompt
    page.set("output_name", "mine")
    page.set("style", "subject")
    assert page.text("output_name") == "mine"
    page.set("subject_prompt", "a photo of sks")
    assert page.text("both_prompt").startswith("a photo of sks")
    # a new file shows up on refresh; a vanished pick is dropped
    (lora_dir / "subject.safetensors").rename(lora_dir / "renamed.safetensors")
    page.fire("refresh")
    assert page.choices["subject"] == ["renamed", "style"]
    assert page.values["subject"] is None and page.values["style"] is None


def test_bad_lora_file_shows_one_readable_line(page: Page, lora_dir: Path, tmp_path: Path) -> None:
    (lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    from ziplora.formats import Family
    from ziplora.synthetic import attention_layers, write_random_lora

    write_random_lora(lora_dir / "sdxl.safetensors", attention_layers(Family.SDXL)[:4], Family.SDXL, rank=2, seed=3)
    page.fire("refresh")
    page.set("subject", "broken")
    summary = page.text("subject_summary")
    assert "ziplora-msg-error" in summary and "broken.safetensors" in summary
    assert "Traceback" not in summary and "\n" not in summary
    page.set("style", "sdxl")
    assert "ziplora-msg-error" in page.text("style_summary") and "Traceback" not in page.text("style_summary")
    page.values.update(output_name="x", **FAST)
    page.fire("zip")
    assert "ziplora-msg-error" in page.text("status")
    assert not (lora_dir / "x.safetensors").exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [("../evil", "plain file name"), ("a/b", "plain file name"), ("", "empty"), ("bad<name>", "characters"), ("CON", "reserved")],
)
def test_bad_output_name_shows_an_error_and_writes_nothing(page: Page, lora_dir: Path, name: str, message: str) -> None:
    before = _files(lora_dir.parent)
    _pick(page)
    page.values["output_name"] = name
    page.fire("zip")
    assert message in page.text("status") and "ziplora-msg-error" in page.text("status")
    assert _files(lora_dir.parent) == before


def test_bad_options_are_one_line_errors(page: Page, lora_dir: Path) -> None:
    _pick(page, output_name="opts")
    for field, value, message in [
        ("steps", None, "steps is empty"),
        ("steps", 0, "steps must be between"),
        ("lr", 5.0, "learning rate"),
        ("resolution", 30, "multiple of 8"),
        ("target_rank", 2.5, "target rank must be a whole number"),
        ("precision", "fp8", "precision must be one of"),
    ]:
        saved = page.values[field]
        page.values[field] = value
        page.fire("zip")
        assert message in page.text("status"), (field, page.text("status"))
        page.values[field] = saved
    page.values["subject"] = None
    page.fire("zip")
    assert "pick a subject LoRA" in page.text("status")
    assert not (lora_dir / "opts.safetensors").exists()


def test_zip_job_runs_to_a_file_with_plots_tag_reexport_and_preview(page: Page, lora_dir: Path, service: MergeService) -> None:
    _pick(page, output_name="zipped")
    page.fire("zip")
    statuses = [y[0] for y in page.yields if isinstance(y[0], str)]
    assert any("ziplora-progress" in s for s in statuses), statuses  # progress shown while polling
    assert "Done: zipped.safetensors" in page.text("status"), page.text("status")
    out = lora_dir / "zipped.safetensors"
    assert out.is_file()
    lora = open_lora(out, expect=service.host.families)
    assert lora.groups and set(lora.trigger_words) >= {"sks shape", "zwx style"}
    # the live plot drew every step; the per-layer similarity plot and the tag are there
    fig = page.values["loss_plot"]
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == 5
    sim = page.values["similarity_plot"]
    assert sim is not None and len(sim.axes[0].get_lines()) == 2
    assert page.text("tag") == "<lora:zipped:1> sks shape, zwx style"
    assert page.visible["result_box"] is True
    result = page.text("result")
    assert "zipped.safetensors" in result and "5 steps" in result and "Mergers moved" in result
    assert page.values["state"]["file"] == str(out)

    # an instant rewrite with another style multiplier
    before = out.read_bytes()
    page.values["style_multiplier"] = 0.5
    page.fire("reexport")
    assert "Rewrote zipped.safetensors with style multiplier 0.5" in page.text("status"), page.text("status")
    assert out.read_bytes() != before
    page.values["style_multiplier"] = 1.7
    page.fire("reexport")
    assert "style multiplier must be between" in page.text("status")

    # the A/B preview grid: 4 rows x 3 columns of (upscaled) 32x32 cells
    page.values["preview_seed"] = 1
    page.fire("preview")
    image = page.values["preview_image"]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 4 * 32 and image.shape[1] > 3 * 32
    assert "ZipLoRA" in page.text("status") and "subject in style" in page.text("status")

    # the same name again without overwrite: refused, the file stays as it was
    written = out.read_bytes()
    page.values["style_multiplier"] = 1.0
    page.fire("zip")
    assert "already exists" in page.text("status")
    assert out.read_bytes() == written


def test_interrupt_stops_the_job_and_leaves_no_file(page: Page, service: MergeService, lora_dir: Path) -> None:
    _pick(page, output_name="stopped", steps=1000)
    other = Page(ui.build_tab(service))
    _pick(other, output_name="second")
    seen: dict[str, Any] = {}

    def between(p: Page, item: tuple[Any, ...]) -> None:
        status = str(item[0])
        if "seen" not in seen and "Optimising the mergers" in status and 'data-step="0"' not in status:
            seen["seen"] = status
            other.fire("zip")  # a second merge while this one runs: refused with a readable line
            seen["other"] = other.text("status")
            p.fire("interrupt")
            seen["interrupt"] = p.values["status"]

    page.fire("zip", between=between)
    assert "seen" in seen, [y[0] for y in page.yields][-3:]
    assert "is running" in seen["other"]
    assert "interrupted" in page.text("status") and "nothing was written" in page.text("status")
    assert not (lora_dir / "stopped.safetensors").exists() and not (lora_dir / "second.safetensors").exists()
    assert not any(p.name.startswith("stopped") for p in lora_dir.iterdir())
    assert service.running() is None
    page.fire("interrupt")
    assert "Nothing is running" in page.text("status")


def test_unexpected_errors_are_one_line_and_logged(page: Page, service: MergeService, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    def boom(*args: Any, **kw: Any) -> str:
        raise RuntimeError("disk on fire\n  second line")

    monkeypatch.setattr(service, "submit_merge", boom)
    _pick(page, output_name="boom")
    with caplog.at_level("ERROR"):
        page.fire("zip")
    assert "internal error: RuntimeError: disk on fire second line" in page.text("status")
    assert "Traceback" not in page.text("status")
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)

    def busy(*args: Any, **kw: Any) -> str:
        raise BusyError("a merge is running (job 1); wait for it or interrupt it")

    monkeypatch.setattr(service, "submit_merge", busy)
    page.fire("zip")
    assert "a merge is running" in page.text("status") and "internal error" not in page.text("status")


def _png(path: Path, rgb: tuple[int, int, int]) -> Path:
    w = h = 32
    raw = b"".join(b"\x00" + bytes(rgb) * w for _ in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))  # fmt: skip
    return path


def test_reference_images_toggle_and_merge(page: Page, lora_dir: Path, tmp_path: Path) -> None:
    images = "Reference images"
    assert page.visible["images_row"] is False
    page.set("inputs", images)
    assert page.visible["images_row"] is True
    _pick(page, output_name="refs", inputs=images)
    page.fire("zip")
    assert "give 1 to 10 subject reference images" in page.text("status")

    class Upload:  # what gradio 3 hands over for a file (gradio 4 hands over a str path)
        def __init__(self, name: str) -> None:
            self.name = name

    subject = [str(_png(tmp_path / f"s{i}.png", (200, 30 * i, 40))) for i in range(2)]
    page.values["subject_images"] = [subject[0], Upload(subject[1])]
    page.values["style_image"] = Upload(str(_png(tmp_path / "style.png", (20, 20, 220))))
    page.fire("zip")
    assert "Done: refs.safetensors" in page.text("status"), page.text("status")
    assert open_lora(lora_dir / "refs.safetensors").groups
    page.set("inputs", next(iter(ui.INPUT_CHOICES)))
    assert page.visible["images_row"] is False


def test_buttons_after_the_merge_need_a_merge_first(page: Page) -> None:
    page.fire("reexport")
    assert "zip two LoRAs first" in page.text("status")
    page.fire("preview")
    assert "zip two LoRAs first" in page.text("status")


@pytest.mark.parametrize(
    ("subject", "style", "both"),
    [
        ("a sks shape", "a shape in zwx style", "a sks shape in zwx style"),
        ("sks dog", "a picture, zwx style", "sks dog, zwx style"),
        ("a photo of sks dog", "watercolor painting", "a photo of sks dog, watercolor painting"),
        ("a photo of sks dog", "a painting in the style of zwx", "a photo of sks dog in the style of zwx"),
        ("", "zwx style", "zwx style"),
        ("  sks  dog ", "", "sks dog"),
    ],
)
def test_combine_prompts(subject: str, style: str, both: str) -> None:
    assert ui.combine_prompts(subject, style) == both


def test_standalone_app_has_the_queue_and_quick_events_skip_it(service: MergeService) -> None:
    from fastapi.testclient import TestClient
    from gradio.routes import App

    app = ui.make_app(service)
    config = app.get_config_file()
    assert config["enable_queue"] is True or getattr(app, "enable_queue", True)
    by_trigger = {}
    for dep in config["dependencies"]:
        for target in dep["targets"]:
            block_id = target[0] if isinstance(target, (list, tuple)) else target
            by_trigger[app.blocks[block_id].elem_id] = dep
    assert by_trigger["ziplora-interrupt"]["queue"] is False  # never stuck behind the polled Zip
    assert by_trigger["ziplora-zip"]["queue"] is not False
    with TestClient(App.create_app(app)) as client:  # the page's config as the browser fetches it
        response = client.get("/config")
        assert response.status_code == 200 and "ziplora-zip" in response.text


def test_launch_standalone_uses_the_toy_host_on_localhost(monkeypatch, toy_host, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seen: dict[str, Any] = {}
    monkeypatch.setattr(ui.standalone, "standalone_host", lambda lora_dir: seen.setdefault("dir", lora_dir) and toy_host)

    def fake_launch(self: Any, **kw: Any) -> None:
        seen.update(kw)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    assert ui.launch_standalone(7999, str(tmp_path)) == 0
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == 7999 and not seen["share"]
    assert seen["dir"] == str(tmp_path)


def test_standalone_host_copies_bundled_loras_or_says_they_are_missing(
    monkeypatch, tmp_path: Path, lora_dir: Path, untrained_model
) -> None:  # type: ignore[no-untyped-def]
    import sys
    import types

    fake = types.ModuleType("ziplora.toy.assets")
    fake.bundled_lora_files = lambda: sorted(lora_dir.glob("*.safetensors"))  # type: ignore[attr-defined]
    fake.load_base_model = lambda: untrained_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ziplora.toy.assets", fake)
    host = ui.standalone_host(str(tmp_path / "toy-loras"))
    assert [p.name for p in host.list_loras()] == ["style.safetensors", "subject.safetensors"]
    assert host.model is untrained_model

    monkeypatch.setitem(sys.modules, "ziplora.toy.assets", None)  # as if the assets were not installed
    from ziplora.errors import ZipLoraError

    with pytest.raises(ZipLoraError, match="bundled toy model"):
        ui.standalone_host(str(tmp_path / "other"))
