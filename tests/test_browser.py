"""The standalone tab in a real browser: Debian's Chromium driven by Playwright (never a downloaded browser).

The app runs in this process on 127.0.0.1 over a toy host with an untrained model and two synthetic LoRAs,
so the test needs no bundled assets and no network. Screenshots go to ``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 120_000

if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("gradio")

from ziplora.formats import Family, open_lora  # noqa: E402
from ziplora.synthetic import attention_layers, write_random_lora  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, untrained_model) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The standalone page (``ui.make_app``) served on 127.0.0.1 with a toy host over synthetic LoRAs."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ziplora import ui
    from ziplora.hosts.toy import ToyHost
    from ziplora.service import MergeService

    folder = tmp_path_factory.mktemp("browser") / "loras"
    folder.mkdir()
    keys = attention_layers(Family.TOYXL)
    write_random_lora(folder / "subject.safetensors", keys, Family.TOYXL, rank=4, seed=1, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "sks shape"})  # fmt: skip
    write_random_lora(folder / "style.safetensors", keys, Family.TOYXL, rank=4, seed=2, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "zwx style"})  # fmt: skip
    service = MergeService(ToyHost(folder, model=untrained_model))
    blocks = ui.make_app(service)
    port = _free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_api=False)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "folder": folder, "service": service}
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def page(browser: Any, app: dict[str, Any]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app["url"].rstrip("/"))
    except Exception:  # noqa: BLE001 - the clipboard check is skipped where permissions are refused
        pass
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(app["url"])
    pg.wait_for_selector("#ziplora-zip")
    try:
        yield pg
    finally:
        context.close()


def _choose(page: Any, elem_id: str, option: str) -> None:
    """Pick an option of a gradio dropdown (a listbox input with an options list in gradio 4)."""
    page.click(f"#{elem_id} input")
    page.click(f'#{elem_id} li[aria-label="{option}"]')


def _status(page: Any) -> str:
    return str(page.inner_text("#ziplora-status"))


def _wait_status(page: Any, pattern: str) -> str:
    page.wait_for_function(
        "(p) => new RegExp(p).test(document.querySelector('#ziplora-status')?.innerText || '')", arg=pattern, timeout=TIMEOUT_MS
    )
    return _status(page)


def _fill_form(page: Any, name: str, steps: int) -> None:
    """Both picks, fast settings and an output name (typed after the suggested one arrives)."""
    _choose(page, "ziplora-subject", "subject")
    _choose(page, "ziplora-style", "style")
    page.wait_for_function("() => document.querySelector('#ziplora-output-name textarea')?.value === 'subject+style-ziplora'")
    page.wait_for_function("() => /rank 4/.test(document.querySelector('#ziplora-subject-summary')?.innerText || '')")
    page.wait_for_function("() => /zwx style/.test(document.querySelector('#ziplora-style-summary')?.innerText || '')")
    assert page.input_value("#ziplora-subject-prompt textarea") == "a sks shape"
    page.click("#ziplora-advanced >> text=Advanced")
    page.fill("#ziplora-steps input", str(steps))
    page.fill("#ziplora-sampling-steps input[type=number]", "3")
    page.fill("#ziplora-samples input[type=number]", "1")
    page.fill("#ziplora-output-name textarea", name)
    page.press("#ziplora-output-name textarea", "Tab")


def _clipboard(page: Any, expected: str) -> str | None:
    """The clipboard's text once it holds ``expected`` (the copy runs asynchronously), or what it holds."""
    text = ""
    for _ in range(50):
        try:
            text = str(page.evaluate("() => navigator.clipboard.readText()"))
        except Exception:  # noqa: BLE001 - a browser that refuses clipboard reads cannot check the copy
            return None
        if text == expected:
            break
        page.wait_for_timeout(100)
    return text


def _screenshot(page: Any, name: str) -> Path:
    """A full-page PNG under test-artifacts/, named after the gradio major version it ran on."""
    import gradio as gr

    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}-gradio{gr.__version__.split('.')[0]}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_zip_in_the_browser_writes_a_file_and_shows_plot_tag_and_preview(page: Any, app: dict[str, Any]) -> None:
    _fill_form(page, "browser-zip", steps=5)
    assert not page.is_visible("#ziplora-send")  # no txt2img in the standalone app
    page.click("#ziplora-zip")
    status = _wait_status(page, "Done:|error|failed")
    assert "Done: browser-zip.safetensors" in status, status
    out = app["folder"] / "browser-zip.safetensors"
    assert out.is_file() and open_lora(out).groups
    page.wait_for_selector("#ziplora-loss-plot img", state="visible")
    page.wait_for_selector("#ziplora-similarity-plot img", state="visible")
    tag = page.input_value("#ziplora-tag textarea")
    assert tag == "<lora:browser-zip:1> sks shape, zwx style"
    assert "5 steps" in page.inner_text("#ziplora-result")
    page.click("#ziplora-copy")
    copied = _clipboard(page, tag)
    assert copied in (tag, None)  # None: this browser refuses clipboard reads, so the copy cannot be checked
    page.click("#ziplora-preview")
    page.wait_for_selector("#ziplora-preview-image img", state="visible")
    assert "subject in style" in _wait_status(page, "Rows:")
    shot = _screenshot(page, "ui-zip")
    assert shot.stat().st_size > 10_000


def test_interrupt_in_the_browser_leaves_no_file(page: Any, app: dict[str, Any]) -> None:
    _fill_form(page, "browser-stopped", steps=1000)
    page.click("#ziplora-zip")
    page.wait_for_function(
        "() => { const p = document.querySelector('#ziplora-status .ziplora-progress');"
        " return p && /Optimising/.test(p.innerText) && Number(p.dataset.step) > 0; }"
    )
    page.click("#ziplora-interrupt")
    status = _wait_status(page, "interrupted|Done:|failed")
    assert re.search("interrupted", status) and "nothing was written" in status, status
    _screenshot(page, "ui-interrupt")
    assert not any(p.name.startswith("browser-stopped") for p in app["folder"].iterdir())
    assert app["service"].running() is None


def test_bad_output_name_in_the_browser_shows_an_error(page: Any, app: dict[str, Any]) -> None:
    before = sorted(p.name for p in app["folder"].parent.rglob("*"))
    _fill_form(page, "../evil", steps=5)
    page.click("#ziplora-zip")
    status = _wait_status(page, "plain file name|Done:")
    assert "must be a plain file name" in status and "Traceback" not in status
    assert page.is_visible("#ziplora-status .ziplora-msg-error")
    assert sorted(p.name for p in app["folder"].parent.rglob("*")) == before


JS_FILE = Path(__file__).resolve().parent.parent / "javascript" / "ziplora.js"


def test_send_to_txt2img_helper_appends_once_and_switches_tab(browser: Any) -> None:
    """javascript/ziplora.js on a page shaped like the WebUI's txt2img prompt."""
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.set_content(
            '<div id="txt2img_prompt"><textarea>a cat</textarea></div>'
            "<script>window.events = 0; window.switched = 0;"
            " document.querySelector('#txt2img_prompt textarea').addEventListener('input', () => window.events++);"
            " function switch_to_txt2img() { window.switched++; }</script>"
        )
        pg.add_script_tag(path=str(JS_FILE))
        tag = "<lora:zipped:1> sks shape, zwx style"
        assert pg.evaluate("(t) => ziplora_send_to_txt2img(t)", tag) == []
        assert pg.input_value("#txt2img_prompt textarea") == f"a cat, {tag}"
        pg.evaluate("(t) => ziplora_send_to_txt2img(t)", tag)  # a second click does not repeat the tag
        assert pg.input_value("#txt2img_prompt textarea") == f"a cat, {tag}"
        assert pg.evaluate("() => [window.events, window.switched]") == [2, 2]
        assert pg.evaluate("() => ziplora_send_to_txt2img('')") == []  # nothing to send: nothing changes
    finally:
        context.close()


def test_webui_mode_tab_sends_the_tag_to_a_txt2img_prompt(browser: Any, app: dict[str, Any]) -> None:
    """The tab as a WebUI mounts it (standalone=False) next to a txt2img prompt, with ziplora.js loaded."""
    import gradio as gr

    from ziplora import ui

    tab = ui.build_tab(app["service"])  # as on_ui_tabs does: built alone, then rendered into the WebUI's page
    with gr.Blocks(analytics_enabled=False) as outer:
        with gr.Tabs():
            with gr.TabItem("txt2img", id="txt2img"):
                gr.Textbox("a cat", elem_id="txt2img_prompt", label="txt2img prompt")
            with gr.TabItem("ZipLoRA", id="ziplora", elem_id="tab_ziplora"):
                tab.render()
    outer.queue()
    port = _free_port()
    outer.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_api=False)
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(f"http://127.0.0.1:{port}/")
        pg.wait_for_selector("#txt2img_prompt textarea")
        pg.add_script_tag(path=str(JS_FILE))  # the WebUI adds every javascript/*.js of an extension to its page
        pg.click("button:has-text('ZipLoRA')")
        pg.wait_for_selector("#ziplora-zip", state="visible")
        _fill_form(pg, "browser-webui", steps=1)
        pg.click("#ziplora-zip")
        assert "Done: browser-webui.safetensors" in _wait_status(pg, "Done:|error|failed")
        assert pg.is_visible("#ziplora-send")
        pg.evaluate("() => { window.switch_to_txt2img = () => { window.switched = true; }; }")
        pg.click("#ziplora-send")
        pg.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('<lora:browser-webui:1>')")
        assert pg.input_value("#txt2img_prompt textarea") == "a cat, <lora:browser-webui:1> sks shape, zwx style"
        assert pg.evaluate("() => window.switched") is True
        pg.click("button:has-text('ZipLoRA')")
        _screenshot(pg, "ui-webui-mode")
    finally:
        context.close()
        outer.close()
