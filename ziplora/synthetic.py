"""Synthetic LoRA files of every kind, for benchmarks and tests (random factors, seeded)."""

from __future__ import annotations

from pathlib import Path

import torch

from ziplora.formats.families import Family, reference_shapes
from ziplora.formats.keys import LayerKey, kohya_name
from ziplora.formats.safetensors_io import write_safetensors

__all__ = ["attention_layers", "random_lora_tensors", "write_random_lora"]

_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def attention_layers(family: Family = Family.SDXL, kohya_default: bool = True) -> list[LayerKey]:
    """kohya's default UNet targets: every Linear in the transformer blocks (+ proj_in/out): 722 on SDXL."""
    shapes = reference_shapes(family)
    assert shapes is not None
    keys = []
    for key, shape in shapes.items():
        if key.component != "unet" or len(shape) != 2 or ".1." not in key.path:
            continue
        if "transformer_blocks" in key.path or key.path.endswith(("proj_in", "proj_out")):
            if kohya_default or key.path.endswith(_ATTENTION):
                keys.append(key)
    return sorted(keys)


def random_lora_tensors(
    keys: list[LayerKey],
    family: Family,
    rank: int,
    seed: int,
    kind: str = "lora",
    alpha: float | None = None,
    scale: float = 0.02,
) -> dict[str, torch.Tensor]:
    """kohya-named tensors of one kind: lora (LoCon on convs), loha, lokr, full."""
    shapes = reference_shapes(family)
    assert shapes is not None
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        shape = shapes[key]
        name = kohya_name(key)
        o, i = shape[0], shape[1]
        k = shape[2:]
        if kind == "lora":
            out[f"{name}.lora_down.weight"] = torch.randn(rank, i, *k, generator=g) * scale
            out[f"{name}.lora_up.weight"] = torch.randn(o, rank, *((1, 1) if k else ()), generator=g) * scale
        elif kind == "loha":
            flat = i * (k[0] * k[1] if k else 1)
            for w in ("w1", "w2"):
                out[f"{name}.hada_{w}_a"] = torch.randn(o, rank, generator=g) * scale
                out[f"{name}.hada_{w}_b"] = torch.randn(rank, flat, generator=g) * scale
        elif kind == "lokr":
            f1 = 4 if o % 4 == 0 and i % 4 == 0 else 1
            out[f"{name}.lokr_w1"] = torch.randn(f1, f1, generator=g)
            out[f"{name}.lokr_w2_a"] = torch.randn(o // f1, rank, generator=g) * scale
            out[f"{name}.lokr_w2_b"] = torch.randn(rank, (i // f1) * (k[0] * k[1] if k else 1), generator=g) * scale
        elif kind == "full":
            out[f"{name}.diff"] = torch.randn(*shape, generator=g) * scale * scale
        else:
            raise ValueError(kind)
        if kind != "full":
            out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    return out


def write_random_lora(
    path: Path,
    keys: list[LayerKey],
    family: Family = Family.SDXL,
    rank: int = 4,
    seed: int = 0,
    kind: str = "lora",
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
    alpha: float | None = None,
    scale: float = 0.02,
) -> Path:
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v)
        for k, v in random_lora_tensors(keys, family, rank, seed, kind, alpha, scale).items()
    }
    meta = dict(metadata or {})
    meta.setdefault("ss_base_model_version", "sdxl_base_v1-0" if family == Family.SDXL else "toyxl_v1")
    write_safetensors(path, tensors, meta, overwrite=True)
    return path
