"""Read every LoRA kind SDXL users have into one canonical model keyed by module path; write kohya files."""

from __future__ import annotations

from ziplora.formats.factors import Factors, svd_factors, truncate_factors
from ziplora.formats.families import Family, reference_shapes
from ziplora.formats.keys import LayerKey, kohya_name
from ziplora.formats.layers import LayerSource
from ziplora.formats.lorafile import LoraFile, LoraSummary, open_lora
from ziplora.formats.safetensors_io import PendingTensor, SafetensorsFile, addnet_hash, write_safetensors

__all__ = [
    "Family",
    "reference_shapes",
    "LayerKey",
    "kohya_name",
    "Factors",
    "LayerSource",
    "svd_factors",
    "truncate_factors",
    "LoraFile",
    "LoraSummary",
    "open_lora",
    "PendingTensor",
    "SafetensorsFile",
    "addnet_hash",
    "write_safetensors",
]
