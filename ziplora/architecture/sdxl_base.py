"""SDXL base 1.0's LoRA targets as pinned data (``sdxl_base.json``), not computed from any model class.

Which keys a LoRA file may name, and the shape each must have, decide what the readers accept; keeping them as
named reference data means no change to a class (the toy's, or the benchmarks') can change them. The golden test
(tests/test_architecture.py) checks the data against ``UNetConfig.sdxl_base()`` and the SDXL text encoder
configurations built from this package's classes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ziplora.architecture.shapes import Shapes

__all__ = ["SDXL_BASE_FILE", "sdxl_base_shapes"]

SDXL_BASE_FILE = Path(__file__).with_name("sdxl_base.json")


@functools.lru_cache(maxsize=1)
def sdxl_base_shapes() -> dict[str, Shapes]:
    """Per component (unet, te1, te2), every Linear / conv weight shape of SDXL base, in module order."""
    data = json.loads(SDXL_BASE_FILE.read_text(encoding="utf-8"))
    return {component: {path: tuple(shape) for path, shape in data[component].items()} for component in ("unet", "te1", "te2")}
