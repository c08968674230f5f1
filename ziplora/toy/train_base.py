"""Train the ToyXL base model on the base subjects and styles (eps prediction, min-SNR weighting, EMA)."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ziplora.toy import world
from ziplora.toy.pipeline import ToyXL
from ziplora.toy.text import pair_prompt, style_prompt, subject_prompt

log = logging.getLogger(__name__)

__all__ = ["BaseTrainConfig", "train_base", "sample_prompt"]


@dataclass(frozen=True)
class BaseTrainConfig:
    steps: int = 9000
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 300
    ema: float = 0.999
    seed: int = 0
    pool: int = 60000
    min_snr_gamma: float = 5.0
    log_every: int = 100
    checkpoint_every: int = 250


def sample_prompt(subject: str, style: str, u: float) -> str:
    """The prompt forms the base model learns: full, subject only, style only, and empty (for guidance)."""
    if u < 0.7:
        return pair_prompt(subject, style)
    if u < 0.8:
        return subject_prompt(subject)
    if u < 0.9:
        return style_prompt(style)
    return ""


def _render_pool(n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], list[str]]:
    images, subjects, styles = [], [], []
    for start in range(0, n, 1024):
        s, t, img = world.random_batch(min(1024, n - start), generator)
        images.append((img * 255).round().byte())
        subjects += s
        styles += t
    return torch.cat(images), subjects, styles


def train_base(cfg: BaseTrainConfig, checkpoint: Path | None = None) -> ToyXL:
    """Train from scratch (or resume from ``checkpoint``); returns the EMA model."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ToyXL()
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # our own file
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        log.info("resumed at step %d", start)
    pool, pool_subjects, pool_styles = _render_pool(cfg.pool, torch.Generator().manual_seed(cfg.seed + 1))
    sched = model.schedule
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    weights = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma for eps prediction
    t0 = time.time()
    running = 0.0
    model.train()
    for step in range(start, cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(pool), (cfg.batch,), generator=gen)
        u = torch.rand(cfg.batch, generator=gen).tolist()
        prompts = [sample_prompt(pool_subjects[i], pool_styles[i], u[k]) for k, i in enumerate(idx.tolist())]
        x0 = model.encode_images(pool[idx].float() / 255)
        t = torch.randint(0, sched.num_timesteps, (cfg.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = sched.add_noise(x0, noise, t)
        out = model.predict(x_t, t, model.encode(prompts))
        per_sample = ((out - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running += loss.item()
        if (step + 1) % cfg.log_every == 0:
            rate = (step + 1 - start) * cfg.batch / (time.time() - t0)
            log.info("step %d/%d loss %.4f lr %.2e %.0f samples/s", step + 1, cfg.steps, running / cfg.log_every, lr, rate)
            running = 0.0
        if checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            tmp = checkpoint.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "step": step + 1,
                    "config": asdict(cfg),
                },
                tmp,
            )
            tmp.replace(checkpoint)
    ema.eval()
    return ema
