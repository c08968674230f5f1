"""The ZipLoRA tab inside the real WebUI, driven in Debian's Chromium by Playwright (ZIPLORA_E2E_MODE=ui only).

Pick the two LoRAs, set a tiny job, Zip, watch the progress, read the result tag, send it to txt2img.
Screenshots go to test-artifacts/e2e/<webui>/ (docs/img/ keeps small copies).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Report, out_dir, timeout
from tests.e2e.loras import STYLE, SUBJECT, TRIGGERS
from tests.e2e.webui import WebUI

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip


def _choose(page: Any, elem_id: str, option: str) -> None:
    """A gradio dropdown (3.41 and 4.x both render the options as ``li`` with aria-label)."""
    page.click(f"#{elem_id} input")
    page.click(f'#{elem_id} li[aria-label="{option}"]')


def _shot(page: Any, webui: WebUI, name: str) -> Path:
    dest = out_dir() / webui.kind
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}.png"
    page.locator("#tab_ziplora").screenshot(path=str(path))
    return path


def test_09_tab_in_the_browser(webui: WebUI, report: Report) -> None:
    if webui.mode != "ui":
        pytest.skip("the tab is tested with ZIPLORA_E2E_MODE=ui (the full web UI)")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    name = f"e2e_tab_{int(time.time())}"
    shots: dict[str, str] = {}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.set_default_timeout(300_000)
            page.goto(webui.base + "/")
            page.wait_for_selector("#tabs")
            page.locator("#tabs > .tab-nav button", has_text="ZipLoRA").click()
            page.wait_for_selector("#ziplora-zip", state="visible")
            _choose(page, "ziplora-subject", SUBJECT)
            _choose(page, "ziplora-style", STYLE)
            page.wait_for_function(
                "(w) => (document.querySelector('#ziplora-style-summary')?.innerText || '').includes(w)", arg=TRIGGERS[STYLE]
            )
            page.click("#ziplora-advanced >> text=Advanced")
            page.fill("#ziplora-steps input", "2")
            page.fill("#ziplora-resolution input", "64")
            page.fill("#ziplora-samples input[type=number]", "1")
            page.fill("#ziplora-sampling-steps input[type=number]", "2")
            page.check("#ziplora-checkpointing input")  # fused layers recomputed per block: no GiBs of W + dW kept
            page.fill("#ziplora-output-name textarea", name)
            page.press("#ziplora-output-name textarea", "Tab")
            shots["picked"] = str(_shot(page, webui, "tab_picked"))
            webui.reset_peak()
            start = time.monotonic()
            page.click("#ziplora-zip")
            page.wait_for_function(
                "() => /Optimising/.test(document.querySelector('#ziplora-status')?.innerText || '')", timeout=timeout() * 1000
            )
            shots["progress"] = str(_shot(page, webui, "tab_progress"))
            page.wait_for_function(
                "() => /Done:|error|failed|interrupted/i.test(document.querySelector('#ziplora-status')?.innerText || '')",
                timeout=timeout() * 1000,
            )
            seconds = time.monotonic() - start
            peak = webui.peak_rss()
            status = page.inner_text("#ziplora-status")
            tag = page.input_value("#ziplora-tag textarea") if page.is_visible("#ziplora-tag textarea") else ""
            shots["done"] = str(_shot(page, webui, "tab_done"))
            sent = ""
            if page.is_visible("#ziplora-send"):
                page.click("#ziplora-send")
                page.wait_for_function(
                    "() => (document.querySelector('#txt2img_prompt textarea')?.value || '').includes('<lora:')", timeout=30_000
                )
                sent = page.input_value("#txt2img_prompt textarea")
        finally:
            browser.close()
    report["browser"] = {
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(peak / 1024**3, 2),
        "status": status,
        "tag": tag,
        "sent_to_txt2img": sent,
        "screenshots": shots,
    }
    assert f"Done: {name}.safetensors" in status, status
    assert tag.startswith(f"<lora:{name}:1>") and TRIGGERS[SUBJECT] in tag and TRIGGERS[STYLE] in tag, tag
    assert (webui.lora_dir / f"{name}.safetensors").is_file()
    assert f"<lora:{name}:1>" in sent, sent
