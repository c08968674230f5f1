"""sd-webui-ziplora's entry point: the WebUI (AUTOMATIC1111 or Forge) imports every .py in scripts/.

Wiring only: the settings, one merge service over the right host, the tab and the API routes. Everything else
lives in the ``ziplora`` package. A failure prints one line in the console and leaves the WebUI running.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

PREFIX = "ZipLoRA:"


def _say(message: str) -> None:
    print(f"{PREFIX} {' '.join(str(message).split())}")  # noqa: T201 - the WebUI console is the user's log


def _extension_dir() -> str:
    """The extension's folder: ``scripts.basedir()`` while the WebUI imports this file, else from ``__file__``."""
    try:
        from modules import scripts

        base = scripts.basedir()
        if base and os.path.isfile(os.path.join(base, "ziplora", "__init__.py")):
            return base
    except Exception:  # noqa: BLE001 - any WebUI without basedir(): fall back to the file's location
        pass
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_path() -> None:
    """Make ``import ziplora`` find this extension's package (the WebUI puts the extension folder on sys.path
    only while it imports this file; the package, once imported, finds its submodules by itself)."""
    if importlib.util.find_spec("ziplora") is None:
        sys.path.append(_extension_dir())


def _setup() -> None:
    _import_path()
    from modules import script_callbacks, shared

    import ziplora
    import ziplora.hosts
    from ziplora.hosts.settings import register_settings
    from ziplora.service import MergeService

    register_settings()  # Settings > ZipLoRA, declared and read in ziplora/hosts/settings.py for both WebUIs
    # one service per process: a "Reload UI" re-imports this file while a merge may be running
    service = getattr(ziplora, "_webui_service", None)
    if service is None:
        service = MergeService(ziplora.hosts.webui_host())
        ziplora._webui_service = service  # type: ignore[attr-defined]

    def ui_tabs() -> list[tuple[Any, str, str]]:
        try:
            from ziplora.ui import build_tab

            return [(build_tab(service, standalone=False), "ZipLoRA", "ziplora")]
        except Exception as err:  # noqa: BLE001 - one line in the console, the WebUI keeps its other tabs
            _say(f"the ZipLoRA tab could not be built: {type(err).__name__}: {err}")
            return []

    def app_started(demo: Any, app: Any) -> None:  # demo is None with --nowebui
        try:
            from ziplora.api import mount

            mount(app, service, getattr(shared.cmd_opts, "api_auth", None))
        except Exception as err:  # noqa: BLE001
            _say(f"the /ziplora/v1 API routes could not be added: {type(err).__name__}: {err}")

    script_callbacks.on_ui_tabs(ui_tabs)
    script_callbacks.on_app_started(app_started)


try:
    _setup()
except Exception as _err:  # noqa: BLE001 - never take the WebUI down with us
    _say(f"the extension failed to load and is inactive: {type(_err).__name__}: {_err}")
