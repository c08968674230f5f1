"""ZipLoRA inside a real AUTOMATIC1111 / Forge: list, zip, load, render, re-export, and leave the user's state alone.

The tests run in file order against one WebUI process per WebUI (conftest.webui) and hand results forward
in ``shared_state``. Figures (timings, peak RSS, hashes) go to ``test-artifacts/e2e/<webui>/report.json``,
images next to it. Opt-in: see conftest.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.conftest import Report, out_dir, timeout
from tests.e2e.loras import STYLE, SUBJECT, TRIGGERS, USER
from tests.e2e.webui import WebUI, addnet_hash, file_sha256

pytestmark = pytest.mark.e2e

GiB = 1024**3
SEED = 1234
SIZE = int(os.environ.get("ZIPLORA_E2E_SIZE", "64"))
STEPS = int(os.environ.get("ZIPLORA_E2E_STEPS", "2"))
PROMPT = "a photo of a dog in a garden"


def _merge_request(webui: WebUI, name: str) -> dict[str, Any]:
    request: dict[str, Any] = {
        "content": SUBJECT,
        "style": STYLE,
        "output_name": name,
        "steps": 3,
        "resolution": 64,
        "samples": 1,
        "sampling_steps": 2,
        "seed": 7,
    }
    if webui.cpu:
        # fused layers keep one W + dW per patched layer alive until backward: several GiB more in fp32
        request["form"] = "side"
    request.update(json.loads(os.environ.get("ZIPLORA_E2E_MERGE", "{}")))
    return request


def _save(webui: WebUI, name: str, image: np.ndarray) -> None:
    from PIL import Image

    dest = out_dir() / webui.kind
    dest.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(dest / f"{name}.png")


def _render(webui: WebUI, report: Report, label: str, prompt: str) -> dict[str, Any]:
    webui.get("/ziplora-e2e/v1/comments")  # start a fresh comment window
    log_start = len(webui.log_text())
    out = webui.txt2img(prompt, SEED, STEPS, SIZE, timeout=timeout())
    out["comments"] = webui.get("/ziplora-e2e/v1/comments")["comments"]
    console = webui.log_text()[log_start:]
    _save(webui, label, out["image"])
    renders = dict(report.get("renders", {}))
    renders[label] = {"prompt": prompt, "seconds": round(out["seconds"], 1), "infotext": out["infotext"], "comments": out["comments"]}
    report["renders"] = renders
    assert not any("Networks with errors" in c for c in out["comments"]), out["comments"]
    assert "Traceback" not in console and "Networks with errors" not in console, console[-3000:]
    return out


def _lora_hashes(infotext: str) -> dict[str, str]:
    """``Lora hashes: "a: 0123456789ab, b: ..."`` from an infotext."""
    marker = 'Lora hashes: "'
    if marker not in infotext:
        return {}
    body = infotext.split(marker, 1)[1].split('"', 1)[0]
    pairs = (item.split(":", 1) for item in body.split(",") if ":" in item)
    return {k.strip(): v.strip() for k, v in pairs}


def _expected_hash(webui: WebUI, path: Path) -> str:
    return (addnet_hash(path) if webui.kind == "a1111" else file_sha256(path))[:12]


def _params(webui: WebUI) -> dict[str, Any]:
    return webui.get("/ziplora-e2e/v1/params-hash", timeout=timeout())["parts"]


# ---------------------------------------------------------------------------------------------------------


def test_01_extension_loaded(webui: WebUI, report: Report) -> None:
    data = webui.get("/ziplora/v1/loras")
    names = {item["name"]: item for item in data["loras"]}
    report["loras_route"] = {"lora_dir": data["lora_dir"], "names": sorted(names)}
    assert Path(data["lora_dir"]).resolve() == webui.lora_dir.resolve()
    for name in (SUBJECT, STYLE, USER):
        assert names[name]["mergeable"], names[name]
        assert names[name]["family"].upper() == "SDXL", names[name]
        assert TRIGGERS[name] in names[name]["trigger_words"], names[name]
    failures = [line for line in webui.log_text().splitlines() if line.startswith("ZipLoRA:")]
    assert not failures, failures


def test_02_baseline_before_the_job(webui: WebUI, report: Report, shared_state: dict[str, Any]) -> None:
    """The user's world before the merge: a plain image, the model's parameter digest, an image with a LoRA."""
    plain = _render(webui, report, "before_plain", PROMPT)
    shared_state["params_before"] = _params(webui)
    user = _render(webui, report, "before_user_lora", f"{PROMPT} <lora:{USER}:1>")
    shared_state.update(plain=plain["image"], user=user["image"])
    report["params_before"] = shared_state["params_before"]
    assert not np.array_equal(plain["image"], user["image"]), "the user's LoRA changed nothing: is the checkpoint's zero-init re-drawn?"
    assert USER in _lora_hashes(user["infotext"]), user["infotext"]


def test_03_merge_through_the_api(webui: WebUI, report: Report, shared_state: dict[str, Any]) -> None:
    name = f"e2e_zipped_{int(time.time())}"
    request = _merge_request(webui, name)
    webui.reset_peak()
    start = time.monotonic()
    status, data = webui.post("/ziplora/v1/merge", request)
    assert status == 202, data
    job = data["job_id"]
    seen: list[dict[str, Any]] = []
    deadline = start + timeout()
    while True:
        status, current = webui.request("GET", f"/ziplora/v1/jobs/{job}")
        assert status == 200, current
        key = (current["stage"], current["step"], current["steps"])
        if not seen or key != (seen[-1]["stage"], seen[-1]["step"], seen[-1]["steps"]):
            seen.append({"t": round(time.monotonic() - start, 1), **{k: current[k] for k in ("state", "stage", "step", "steps", "text")}})
        if current["state"] != "running":
            break
        assert time.monotonic() < deadline, f"the merge did not finish within {timeout():.0f} s; last: {current}"
        time.sleep(1.0)
    seconds = time.monotonic() - start
    report["merge"] = {
        "request": request,
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(webui.peak_rss() / GiB, 2),
        "sampled_max_rss_gib": round(webui.max_rss_since(start) / GiB, 2),
        "progress": seen,
        "state": current["state"],
        "error": current["error"],
        "result": current["result"],
        "losses": current["losses"],
    }
    assert current["state"] == "done", current["error"]
    stages = {s["stage"] for s in seen if s["state"] == "running"}
    assert len(stages) >= 2, f"progress showed no stages while running: {seen}"
    result = current["result"]
    assert result["name"] == name and result["steps"] >= 1
    shared_state.update(name=name, path=Path(result["file"]), result=result)


def test_04_user_state_untouched(webui: WebUI, report: Report, shared_state: dict[str, Any]) -> None:
    """Right after the job: same parameters; the user's LoRA image and the plain image render bit-identically."""
    assert "name" in shared_state, "the merge did not run"
    after = _params(webui)
    report["params_after"] = after
    assert after == shared_state["params_before"]
    user = _render(webui, report, "after_user_lora", f"{PROMPT} <lora:{USER}:1>")
    plain = _render(webui, report, "after_plain", PROMPT)
    diff = {
        "user_lora_max_abs": int(np.abs(user["image"].astype(int) - shared_state["user"].astype(int)).max()),
        "plain_max_abs": int(np.abs(plain["image"].astype(int) - shared_state["plain"].astype(int)).max()),
    }
    report["state_untouched"] = {**diff, "params_equal": True}
    assert diff == {"user_lora_max_abs": 0, "plain_max_abs": 0}, diff


def test_05_written_file(webui: WebUI, report: Report, shared_state: dict[str, Any]) -> None:
    """The file, its metadata and sidecar; the WebUI lists it and loads it with zero unmatched keys."""
    from safetensors import safe_open

    assert "name" in shared_state, "the merge did not run"
    name, path = shared_state["name"], shared_state["path"]
    assert path.parent.resolve() == webui.lora_dir.resolve() and path.is_file()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    sidecar = json.loads(path.with_suffix(".json").read_text())
    listed = {item["name"]: item for item in webui.get("/sdapi/v1/loras")}  # no refresh-loras call: ours did it
    keys = webui.get(f"/ziplora-e2e/v1/lora-keys?name={name}")
    report["file"] = {
        "size_mib": round(path.stat().st_size / 2**20, 2),
        "metadata_keys": sorted(meta),
        "sidecar": sidecar,
        "listed_by_sdapi_loras": name in listed,
        "lora_keys": keys,
        "mergers_file": path.with_suffix(".ziplora").is_file(),
    }
    assert meta.get("ss_base_model_version", "").startswith("sdxl_"), meta
    assert meta.get("modelspec.architecture") == "stable-diffusion-xl-v1-base/lora", meta
    assert any(k.startswith("ziplora_") for k in meta), sorted(meta)
    assert sidecar.get("sd version") == "SDXL", sidecar
    assert path.with_suffix(".ziplora").is_file(), "the mergers were not kept beside the file"
    for trigger in (TRIGGERS[SUBJECT], TRIGGERS[STYLE]):
        assert trigger in sidecar.get("activation text", ""), sidecar
    assert name in listed, sorted(listed)
    assert "error" not in keys, keys
    assert keys["unmatched"] == [] and keys["matched"] == keys["file_modules"], keys
    assert not keys.get("skipped") and not keys.get("debug_unmatched_messages"), keys


def test_06_render_with_the_zipped_lora(webui: WebUI, report: Report, shared_state: dict[str, Any]) -> None:
    assert "name" in shared_state, "the merge did not run"
    name, path = shared_state["name"], shared_state["path"]
    zipped = _render(webui, report, "zipped", f"{PROMPT} <lora:{name}:1>")
    hashes = _lora_hashes(zipped["infotext"])
    expected = _expected_hash(webui, path)
    report["zipped_render"] = {
        "infotext_hash": hashes.get(name),
        "expected_hash": expected,
        "result_shorthash": shared_state["result"]["shorthash"],
    }
    assert not np.array_equal(zipped["image"], shared_state["plain"]), "the zipped LoRA changed nothing"
    assert hashes.get(name) == expected, (zipped["infotext"], expected)
    shared_state["zipped"] = zipped["image"]


def test_07_style_multiplier_reexport(webui: WebUI, report: Report, shared_state: dict[str, Any]) -> None:
    """A new style strength, written under the same name: the next render uses the new tensors (no stale cache)."""
    assert "zipped" in shared_state, "no zipped render to compare with"
    name, path = shared_state["name"], shared_state["path"]
    before = _expected_hash(webui, path)
    start = time.monotonic()
    status, data = webui.post("/ziplora/v1/reexport", {"name": name, "style_multiplier": 0.25})
    seconds = time.monotonic() - start
    assert status == 200, data
    after = _expected_hash(webui, path)
    rendered = _render(webui, report, "zipped_style_0.25", f"{PROMPT} <lora:{name}:1>")
    hashes = _lora_hashes(rendered["infotext"])
    report["reexport"] = {"seconds": round(seconds, 1), "hash_before": before, "hash_after": after, "infotext_hash": hashes.get(name)}
    assert before != after
    assert hashes.get(name) == after, rendered["infotext"]
    assert not np.array_equal(rendered["image"], shared_state["zipped"]), "the re-exported file rendered like the old one (stale cache)"
    assert not np.array_equal(rendered["image"], shared_state["plain"])


def test_08_peak_memory(webui: WebUI, report: Report) -> None:
    report["process_peak_rss_gib_since_last_reset"] = round(webui.peak_rss() / GiB, 2)
    report["max_sampled_rss_gib"] = round(webui.max_rss_since(0) / GiB, 2)
