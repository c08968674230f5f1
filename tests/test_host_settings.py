"""Settings > ZipLoRA: declared and read in one place (ziplora/hosts/settings.py) for both WebUIs.

The hosts' use of them is tested with each host (test_host_a1111.py, test_host_forge.py); these tests cover the
reader itself and that no other module reads or names the options.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from ziplora.errors import HostError
from ziplora.hosts.settings import OPTION_DEFAULTS, WebUISettings, read_settings

REPO = Path(__file__).resolve().parents[1]


def _webui_with(monkeypatch: pytest.MonkeyPatch, **opts: object) -> None:
    shared = types.ModuleType("modules.shared")
    shared.opts = types.SimpleNamespace(**opts)  # type: ignore[attr-defined]
    package = types.ModuleType("modules")
    package.shared = shared  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "modules", package)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)


def test_the_options_are_read_in_one_module_only() -> None:
    """No other module names an option or reads ``shared.opts`` (settings.py builds the keys from its fields)."""
    keys = set(OPTION_DEFAULTS)
    assert keys == {"ziplora_resolution", "ziplora_guidance", "ziplora_preview_steps", "ziplora_save_previews"}
    files = [*(REPO / "ziplora").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    texts = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in files}
    assert sorted(name for name, text in texts.items() if any(k in text for k in keys)) == []
    assert sorted(name for name, text in texts.items() if re.search(r"\bopts\b", text.replace("cmd_opts", ""))) == [
        "ziplora/hosts/settings.py"
    ]


def test_the_defaults_apply_without_a_webui_or_without_registered_options(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "modules", None)  # no WebUI: ``from modules import shared`` raises ImportError
        assert read_settings() == WebUISettings() == WebUISettings(1024, 5.0, 20, False)
    _webui_with(monkeypatch)  # a WebUI where the options were never registered (Options raises AttributeError)
    assert read_settings() == WebUISettings()


def test_values_are_typed_and_a_given_override_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    _webui_with(monkeypatch, ziplora_resolution="768", ziplora_guidance=7, ziplora_preview_steps=12.0, ziplora_save_previews=1)
    settings = read_settings()
    assert settings == WebUISettings(768, 7.0, 12, True)
    types_ = [type(v) for v in (settings.resolution, settings.guidance, settings.preview_steps, settings.save_previews)]
    assert types_ == [int, float, int, bool]
    assert read_settings(resolution=32, preview_steps=None) == WebUISettings(32, 7.0, 12, True)


def test_a_value_that_is_no_number_is_one_line_naming_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    _webui_with(monkeypatch, ziplora_guidance="strong")
    with pytest.raises(HostError) as err:
        read_settings()
    assert "ziplora_guidance" in str(err.value) and "'strong'" in str(err.value) and "\n" not in str(err.value)
