"""Noise schedules and a DDIM sampler, shared by the data-free inputs, previews and the toy world."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["NoiseSchedule", "ddim_timesteps", "ddim_sample", "Cond", "cond_cat", "cond_index", "cond_repeat"]

# A conditioning is a dict of batch-first tensors, as SDXL's {"crossattn": [B, L, C], "vector": [B, D]}.
Cond = dict


def cond_cat(conds: list[Cond]) -> Cond:
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in conds[0]}


def cond_index(cond: Cond, index: torch.Tensor | slice | list[int]) -> Cond:
    return {k: v[index] for k, v in cond.items()}


def cond_repeat(cond: Cond, n: int) -> Cond:
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM schedule: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``."""

    alphas_cumprod: torch.Tensor  # [T], float32
    prediction_type: str = "epsilon"  # or "v_prediction"

    @staticmethod
    def scaled_linear(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> NoiseSchedule:
        """SDXL's schedule (sgm ``LegacyDDPMDiscretization``)."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        return NoiseSchedule(torch.cumprod(1 - betas, dim=0).float())

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _a(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device)].float()
        return a.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._a(t, x0)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output at (x0, noise, t)."""
        if self.prediction_type == "v_prediction":
            a = self._a(t, x0)
            return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)
        return noise

    def split(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) from a model output."""
        a = self._a(t, x_t)
        out, x = model_out.float(), x_t.float()
        if self.prediction_type == "v_prediction":
            eps = a.sqrt() * out + (1 - a).sqrt() * x
        else:
            eps = out
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return eps, x0


def ddim_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """Evenly spaced, trailing timesteps from the noisiest one down."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    n = schedule.num_timesteps
    ts = torch.linspace(n - 1, 0, steps + 1)[:-1].round().long().tolist()
    return [int(t) for t in ts]


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def ddim_sample(
    predict: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor],
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    cond: Cond,
    uncond: Cond | None,
    steps: int,
    guidance: float,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM with classifier-free guidance; returns x0.

    ``on_step(i, x_t, t, cond_output)`` sees every state and the conditional model output there: the
    data-free ZipLoRA inputs record exactly these (state, teacher target) pairs.
    """
    x = noise
    b = noise.shape[0]
    timesteps = ddim_timesteps(schedule, steps)
    for i, t_int in enumerate(timesteps):
        t = torch.full((b,), t_int, dtype=torch.long, device=noise.device)
        if uncond is not None and guidance != 1.0:
            both = predict(torch.cat([x, x]), torch.cat([t, t]), cond_cat([cond, uncond]))
            out_c, out_u = both.chunk(2)
            out = out_u.float() + guidance * (out_c.float() - out_u.float())
        else:
            out_c = predict(x, t, cond)
            out = out_c.float()
        if on_step is not None:
            on_step(i, x, t, out_c)
        eps, x0 = schedule.split(out, x, t)
        if i + 1 < len(timesteps):
            a_prev = schedule.alphas_cumprod[timesteps[i + 1]].to(x.device).float()
            x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(noise.dtype)
        else:
            x = x0.to(noise.dtype)
    return x
