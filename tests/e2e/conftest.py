"""The end-to-end suite runs only against a WebUI the tester already installed (never in CI, never by default).

    ZIPLORA_WEBUI_DIR=/path/to/stable-diffusion-webui       AUTOMATIC1111 (v1.10.x)
    ZIPLORA_FORGE_DIR=/path/to/stable-diffusion-webui-forge Forge 2
    python -m pytest -m e2e tests/e2e

Optional:
    ZIPLORA_WEBUI_PYTHON / ZIPLORA_FORGE_PYTHON   the WebUI's interpreter (default: its venv/, else this one)
    ZIPLORA_E2E_CKPT        the SDXL checkpoint (default: the first SDXL base in models/Stable-diffusion)
    ZIPLORA_E2E_MODE        api (default: --nowebui) or ui (the full web UI, adds the browser test)
    ZIPLORA_E2E_DEVICE      auto (default), cpu or gpu: cpu adds the CPU flags (see webui.WebUI.args)
    ZIPLORA_E2E_ARGS        more WebUI flags, e.g. "--medvram"
    ZIPLORA_E2E_MERGE       JSON merged into the merge request (default: 3 steps at 64x64, 1 sample, 2 sampling steps)
    ZIPLORA_E2E_SIZE, ZIPLORA_E2E_STEPS   txt2img size (64) and steps (2)
    ZIPLORA_E2E_TIMEOUT     seconds for start-up, each generation and the merge (default 3600)
    ZIPLORA_E2E_OUT         where the report, images, screenshots and WebUI logs go (default test-artifacts/e2e)
    ZIPLORA_E2E_NICE        niceness of the WebUI process (default 19; empty for none)

Each WebUI runs alone (they are never started together), once for all the tests of its parameter.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.webui import REPO, WebUI, find_sdxl_checkpoint, has_gpu, python_for

KINDS = {"a1111": ("ZIPLORA_WEBUI_DIR", "ZIPLORA_WEBUI_PYTHON"), "forge": ("ZIPLORA_FORGE_DIR", "ZIPLORA_FORGE_PYTHON")}


def _configured() -> list[str]:
    return [kind for kind, (env, _) in KINDS.items() if os.environ.get(env)]


def out_dir() -> Path:
    return Path(os.environ.get("ZIPLORA_E2E_OUT") or REPO / "test-artifacts" / "e2e")


def timeout() -> float:
    return float(os.environ.get("ZIPLORA_E2E_TIMEOUT", "3600"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "webui" in metafunc.fixturenames:
        kinds = _configured() or ["none"]
        metafunc.parametrize("webui", kinds, indirect=True, scope="session")


class Report:
    """Figures of one WebUI's run, written as JSON next to the images (docs/real-webui.md quotes them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


@pytest.fixture(scope="session")
def webui(request: pytest.FixtureRequest) -> Iterator[WebUI]:
    kind = request.param
    if kind == "none":
        pytest.skip("set ZIPLORA_WEBUI_DIR (AUTOMATIC1111) or ZIPLORA_FORGE_DIR (Forge) to an installed WebUI")
    env_dir, env_python = KINDS[kind]
    root = Path(os.environ[env_dir]).expanduser().resolve()
    if not (root / "launch.py").is_file():
        pytest.skip(f"{env_dir}={root} is not a WebUI folder (no launch.py)")
    checkpoint = find_sdxl_checkpoint(root)
    if checkpoint is None:
        pytest.skip(f"no SDXL checkpoint: set ZIPLORA_E2E_CKPT or put one in {root / 'models' / 'Stable-diffusion'}")
    device = os.environ.get("ZIPLORA_E2E_DEVICE", "auto")
    scratch = Path(tempfile.mkdtemp(prefix=f"ziplora-e2e-{kind}-"))
    ui = WebUI(
        kind=kind,
        root=root,
        python=python_for(root, env_python),
        checkpoint=checkpoint,
        scratch=scratch,
        mode=os.environ.get("ZIPLORA_E2E_MODE", "api"),
        extra_args=shlex.split(os.environ.get("ZIPLORA_E2E_ARGS", "")),
        cpu=device == "cpu" or (device == "auto" and not has_gpu()),
    )
    from tests.e2e.loras import write_test_loras

    write_test_loras(ui.lora_dir)
    try:
        ui.start(timeout())
        yield ui
    finally:
        ui.stop()
        dest = out_dir() / kind
        dest.mkdir(parents=True, exist_ok=True)
        if ui.log_path is not None and ui.log_path.exists():
            (dest / "webui.log").write_text(ui.log_text())
        if os.environ.get("ZIPLORA_E2E_KEEP") != "1":
            shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def report(webui: WebUI) -> Report:
    r = Report(out_dir() / webui.kind / "report.json")
    r["webui"] = webui.kind
    r["mode"] = webui.mode
    r["cpu"] = webui.cpu
    r["args"] = webui.args()
    r["checkpoint"] = str(webui.checkpoint)
    r["start_seconds"] = round(webui.ready_seconds, 1)
    return r


@pytest.fixture(scope="session")
def shared_state(webui: WebUI) -> dict[str, Any]:
    """What one test leaves for the next (the suite is a sequence: baseline, merge, checks)."""
    return {}
