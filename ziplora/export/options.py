"""What an export is asked for (``ExportOptions``) and what it reports (``ExportReport``, one ``LayerReport`` a layer)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ziplora.formats.keys import LayerKey

__all__ = ["ExportOptions", "ExportReport", "LayerReport", "Mergers"]

Mergers = dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]  # layer -> (m_c, m_s), fp32, one per input column


@dataclass(frozen=True)
class ExportOptions:
    content_weight: float = 1.0
    style_multiplier: float = 1.0
    target_rank: int | None = None
    dtype: torch.dtype = torch.float16
    overwrite: bool = False
    description: str = ""
    author: str = ""
    base_model_version: str = "sdxl_base_v1-0"
    architecture: str = "stable-diffusion-xl-v1-base/lora"
    resolution: str = "1024x1024"
    sd_version: str = "SDXL"
    write_sidecar: bool = True


@dataclass(frozen=True)
class LayerReport:
    key: LayerKey
    sources: str  # "both" | "content" | "style"
    rank: int
    how: str  # "exact" | "svd"
    relative_error: float


@dataclass
class ExportReport:
    path: Path
    sha256: str  # addnet hash of the written file (what A1111 shows, and Civitai's AutoV3)
    alpha: float
    layers: list[LayerReport]
    relative_error: float  # over all layers, weighted by each layer's Frobenius norm
    seconds: float
    size_bytes: int
    sidecar: Path | None = None
    mergers_file: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def shorthash(self) -> str:
        return self.sha256[:12]

    def rank_counts(self) -> dict[int, int]:
        return dict(Counter(layer.rank for layer in self.layers))
