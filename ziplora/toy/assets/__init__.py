"""The bundled toy assets: the trained ToyXL base model, its subject and style LoRAs, and the two scorers.

Built by ``python -m ziplora.toy build`` (seeded, reproducible); see manifest.json for what each file is
and the figures measured when it was built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ziplora.errors import HostError

__all__ = ["ASSETS", "BASE_MODEL", "LORA_DIR", "SCORERS", "MANIFEST", "load_base_model", "bundled_lora_files", "load_scorers", "manifest"]

ASSETS = Path(__file__).resolve().parent
BASE_MODEL = ASSETS / "base.safetensors"
LORA_DIR = ASSETS / "loras"
SCORERS = ASSETS / "scorers.safetensors"
MANIFEST = ASSETS / "manifest.json"


def _missing(path: Path) -> HostError:
    return HostError(f"the bundled toy asset {path.name} is missing; rebuild it with: python -m ziplora.toy build")


def load_base_model(path: Path | None = None):  # type: ignore[no-untyped-def]
    from ziplora.toy.pipeline import ToyXL

    path = path or BASE_MODEL
    if not path.is_file():
        raise _missing(path)
    return ToyXL.load(path)


def bundled_lora_files(folder: Path | None = None) -> list[Path]:
    folder = folder or LORA_DIR
    return sorted(folder.glob("*.safetensors"))


def load_scorers(path: Path | None = None):  # type: ignore[no-untyped-def]
    from ziplora.toy.scorers import load_scorers as _load

    path = path or SCORERS
    if not path.is_file():
        raise _missing(path)
    return _load(path)


def manifest(path: Path | None = None) -> dict[str, Any]:
    path = path or MANIFEST
    if not path.is_file():
        raise _missing(path)
    return json.loads(path.read_text(encoding="utf-8"))
