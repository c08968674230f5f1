"""A DreamBooth-LoRA trainer for ToyXL that writes kohya-format files.

Targets are kohya's defaults for SDXL: every Linear in the UNet's transformer blocks plus proj_in /
proj_out (and, optionally, the text encoders' attention and MLP Linears). Training goes through the same
``patch_layers`` machinery the merges use: the LoRA factors are the patched parts, trained in place.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ziplora.formats.families import Family, reference_shapes
from ziplora.formats.keys import LayerKey, kohya_name
from ziplora.formats.safetensors_io import atomic_write_bytes, write_safetensors
from ziplora.hosts.base import resolve_in_roots
from ziplora.merge.patch import Part, patch_layers
from ziplora.synthetic import attention_layers
from ziplora.toy.pipeline import ToyXL

log = logging.getLogger(__name__)

__all__ = ["LoraTrainConfig", "train_lora", "save_kohya_lora", "text_encoder_layers"]


@dataclass(frozen=True)
class LoraTrainConfig:
    rank: int = 8
    alpha: float = 8.0
    steps: int = 400
    batch: int = 8
    lr: float = 2e-3
    text_encoder: bool = False
    prior_preservation: bool = False
    prior_prompt: str = "a shape"
    prior_images: int = 16
    prior_weight: float = 1.0
    seed: int = 0


def text_encoder_layers() -> list[LayerKey]:
    shapes = reference_shapes(Family.TOYXL)
    assert shapes is not None
    return sorted(k for k in shapes if k.component in ("te1", "te2"))


def train_lora(
    model: ToyXL,
    images: torch.Tensor,
    prompts: list[str],
    cfg: LoraTrainConfig,
) -> dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]:
    """Train a LoRA on ``images`` [N, 3, 32, 32] in [0, 1] with one prompt per image; returns (down, up)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    keys = attention_layers(Family.TOYXL) + (text_encoder_layers() if cfg.text_encoder else [])
    shapes = reference_shapes(Family.TOYXL)
    assert shapes is not None
    factors: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]] = {}
    parts = {}
    scale = cfg.alpha / cfg.rank
    for key in keys:
        out_f, in_f = shapes[key][:2]
        down = (torch.rand(cfg.rank, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f)  # kohya: kaiming-uniform down
        up = torch.zeros(out_f, cfg.rank)  # and zero up, so training starts from the base model
        down.requires_grad_(True)
        up.requires_grad_(True)
        factors[key] = (down, up)
        # the part's up carries the alpha/rank scale, as the written file will
        parts[key] = (_ScaledPart(up, down, scale), None)
    roots = {"unet": model.unet, "te1": model.te1, "te2": model.te2}
    model.eval().requires_grad_(False)
    params = [t for pair in factors.values() for t in pair]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    x0 = model.encode_images(images)
    prior_x0 = None
    if cfg.prior_preservation:
        prior_x0 = model.encode_images(model.generate([cfg.prior_prompt] * cfg.prior_images, seed=cfg.seed + 7))
    sched = model.schedule
    with patch_layers(lambda k: resolve_in_roots(roots, k), parts, torch.device("cpu"), "fused") as patches:
        patches.set_mode("content")
        for step in range(cfg.steps):
            idx = torch.randint(len(x0), (cfg.batch,), generator=gen)
            batch_x0 = x0[idx]
            batch_prompts = [prompts[i] for i in idx.tolist()]
            if prior_x0 is not None:
                pidx = torch.randint(len(prior_x0), (cfg.batch // 2,), generator=gen)
                batch_x0 = torch.cat([batch_x0, prior_x0[pidx]])
                batch_prompts += [cfg.prior_prompt] * len(pidx)
            t = torch.randint(0, sched.num_timesteps, (len(batch_x0),), generator=gen)
            noise = torch.randn(batch_x0.shape, generator=gen)
            x_t = sched.add_noise(batch_x0, noise, t)
            with torch.enable_grad():
                cond = model.encode(batch_prompts)
                out = model.predict(x_t, t, cond)
                per = ((out - noise) ** 2).mean(dim=(1, 2, 3))
                n = cfg.batch
                loss = per[:n].mean() + (cfg.prior_weight * per[n:].mean() if len(per) > n else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % 100 == 0:
                log.info("lora step %d/%d loss %.4f", step + 1, cfg.steps, float(loss.detach()))
    return {k: (d.detach(), u.detach()) for k, (d, u) in factors.items()}


class _ScaledPart(Part):
    """A trainable part whose effective up matrix is ``up * alpha / rank`` (kohya's scale)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
        super().__init__(up, down, None, None)
        self._scale = scale

    def delta(self, dtype: torch.dtype, use_merger: bool) -> torch.Tensor:
        return (self.up.to(dtype) * self._scale) @ self.down.to(dtype)


def save_kohya_lora(
    path: Path,
    factors: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]],
    cfg: LoraTrainConfig,
    trigger: str,
    tag_dir: str,
    description: str,
    images: int,
) -> None:
    """Write the LoRA as sd-scripts does (fp16, ss_* metadata, tag frequency) plus an A1111 sidecar."""
    tensors = {}
    for key, (down, up) in sorted(factors.items()):
        name = kohya_name(key)
        tensors[f"{name}.lora_down.weight"] = down.to(torch.float16).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.to(torch.float16).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(cfg.alpha, dtype=torch.float16)
    words = [w for w in trigger.replace(",", " ").split() if w]
    metadata = {
        "ss_base_model_version": "toyxl_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": f"{cfg.alpha:g}",
        "ss_network_args": "{}",
        "ss_output_name": path.stem,
        "ss_num_train_images": str(images),
        "ss_max_train_steps": str(cfg.steps),
        "ss_learning_rate": f"{cfg.lr:g}",
        "ss_training_comment": description,
        "ss_tag_frequency": json.dumps({tag_dir: {w: images for w in words}}),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "toyxl-v1/lora",
        "modelspec.title": path.stem,
        "modelspec.trigger_phrase": trigger,
        "modelspec.description": description,
    }
    write_safetensors(path, tensors, metadata, overwrite=True)
    sidecar = {"description": description, "sd version": "Unknown", "activation text": trigger, "preferred weight": 1.0, "notes": ""}
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(sidecar, indent=4).encode(), overwrite=True)
