"""The A/B preview: subject alone, style alone, direct merge and ZipLoRA, each on three prompts, one seed.

Rows are LoRA stacks rendered by the host (the WebUIs through their own txt2img, the toy host with its
sampler): the direct merge is exactly both LoRAs at weight 1 stacked, so it needs no file of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ziplora.errors import InvalidRequestError
from ziplora.formats.families import Family
from ziplora.formats.keys import LayerKey
from ziplora.formats.lorafile import open_lora
from ziplora.images import make_grid, to_uint8, upscale_nearest
from ziplora.schedule import ddim_sample

__all__ = ["PreviewSpec", "PreviewGrid", "preview_rows", "preview_prompts", "assemble_grid", "sample_images", "stack_parts"]


@dataclass(frozen=True)
class PreviewSpec:
    subject: Path
    style: Path
    zipped: Path
    subject_prompt: str  # e.g. "a sks shape"
    style_prompt: str  # e.g. "a shape in zwx style"
    both_prompt: str  # e.g. "a sks shape in zwx style"
    seed: int = 0


@dataclass
class PreviewGrid:
    image: np.ndarray  # uint8 [H, W, 3]
    rows: list[str]
    columns: list[str]
    cells: torch.Tensor  # [rows * cols, 3, h, w] in [0, 1]


def preview_prompts(spec: PreviewSpec) -> list[str]:
    return [spec.both_prompt, spec.subject_prompt, spec.style_prompt]


def preview_rows(spec: PreviewSpec) -> list[tuple[str, list[tuple[Path, float]]]]:
    """(row label, LoRA stack) per row."""
    return [
        ("subject LoRA alone", [(spec.subject, 1.0)]),
        ("style LoRA alone", [(spec.style, 1.0)]),
        ("direct merge", [(spec.subject, 1.0), (spec.style, 1.0)]),
        ("ZipLoRA", [(spec.zipped, 1.0)]),
    ]


def assemble_grid(cells: torch.Tensor, rows: list[str], columns: list[str], min_cell: int = 96) -> PreviewGrid:
    """Tile [rows*cols, 3, h, w] images; small cells (the toy's 32x32) are upscaled to stay visible."""
    h = cells.shape[-2]
    factor = max(1, min_cell // h)
    tiles = np.stack([upscale_nearest(c, factor) for c in to_uint8(cells)])
    grid = make_grid(tiles, len(rows), len(columns), pad=max(2, factor))
    return PreviewGrid(grid, rows, columns, cells)


def stack_parts(loras: list[tuple[Path, float]], families: tuple[Family, ...], device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """Patch parts for a stack of at most two LoRAs at their weights (our own hosts' renderer)."""
    from ziplora.merge.patch import Part

    if len(loras) > 2:
        raise InvalidRequestError("a preview row stacks at most two LoRAs")
    files = [(open_lora(path, expect=families), weight) for path, weight in loras]
    keys: set[LayerKey] = set()
    for lora, _ in files:
        keys |= set(lora.groups)
    parts = {}
    for key in sorted(keys):
        slots = []
        for lora, weight in files:
            if key in lora.groups:
                f = lora.layer(key).factors()[0].scale_outputs(weight)
                slots.append(Part.from_factors(f, device, dtype, None))
            else:
                slots.append(None)
        slots += [None] * (2 - len(slots))
        parts[key] = (slots[0], slots[1])
    return parts


@torch.no_grad()
def sample_images(session, prompts: list[str], seed: int, steps: int, guidance: float, width: int, height: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Our own DDIM with guidance: every prompt from the same seed's noise. Images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, *session.latent_shape(width, height), generator=g).repeat(len(prompts), 1, 1, 1)
    noise = noise.to(session.device, session.dtype)
    x0 = ddim_sample(
        session.predict, session.schedule, noise, session.encode(prompts), session.encode_negative(len(prompts)), steps, guidance
    )
    return session.decode(x0).float().cpu()
