"""The ZipLoRA optimisation: merger vectors, Adam at the paper's settings, and the result object."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ziplora.errors import JobFailed, JobInterrupted
from ziplora.formats.keys import LayerKey
from ziplora.formats.layers import Factors
from ziplora.inputs import TrainingInputs
from ziplora.merge.loss import layer_similarity, mean_abs_cos, reconstruction, similarity_term
from ziplora.merge.patch import Part, PatchSet
from ziplora.progress import Progress, StepRecord
from ziplora.schedule import Cond, cond_cat

log = logging.getLogger(__name__)

__all__ = ["ZipOptions", "ZipResult", "MergerMovement", "NonFiniteLoss", "build_parts", "optimize_mergers"]


@dataclass(frozen=True)
class ZipOptions:
    """Paper settings: Adam, lr 1e-2, λ 0.01, at most 100 steps, stop when the mergers no longer overlap."""

    steps: int = 100
    lr: float = 1e-2
    lam: float = 0.01
    similarity: str = "dot"  # "dot" = |m_c·m_s| (the paper's formula), "cos" = |cos(m_c, m_s)|
    reduction: str = "sum"  # squared error summed over a sample's elements ("sum") or averaged ("mean")
    stop_similarity: float = 0.01  # stop once mean |cos(m_c, m_s)| over layers falls below this
    seed: int = 0


class NonFiniteLoss(JobFailed):
    """The loss became NaN or Inf (typically fp16 overflow); ``dtype`` is the precision it happened in."""

    def __init__(self, message: str, dtype: torch.dtype) -> None:
        super().__init__(message)
        self.dtype = dtype


@dataclass(frozen=True)
class MergerMovement:
    """How far the mergers moved from 1 (where they start: the direct merge)."""

    mean_abs_change_content: float
    mean_abs_change_style: float
    share_below_0_1_content: float
    share_below_0_1_style: float

    @property
    def mean_abs_change(self) -> float:
        return (self.mean_abs_change_content + self.mean_abs_change_style) / 2


@dataclass
class ZipResult:
    mergers: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]  # cpu fp32
    history: list[StepRecord]
    cos_before: dict[LayerKey, float]
    cos_after: dict[LayerKey, float]
    movement: MergerMovement
    steps_run: int
    stop_reason: str
    seconds: float
    forms: dict[str, int] = field(default_factory=dict)

    @property
    def final_similarity(self) -> float:
        return sum(self.cos_after.values()) / max(1, len(self.cos_after))

    @property
    def initial_similarity(self) -> float:
        return sum(self.cos_before.values()) / max(1, len(self.cos_before))


def build_parts(
    factors: dict[LayerKey, tuple[Factors | None, Factors | None]],
    device: torch.device,
    dtype: torch.dtype,
    trainable: Callable[[LayerKey], bool] = lambda key: True,
) -> tuple[dict[LayerKey, tuple[Part | None, Part | None]], dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]]:
    """Parts on the device, and fp32 merger vectors (starting at 1) for every layer both sources touch."""
    parts: dict[LayerKey, tuple[Part | None, Part | None]] = {}
    mergers: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, (fc, fs) in factors.items():
        mc = ms = None
        if fc is not None and fs is not None and trainable(key):
            width = fc.shape[1]
            mc = torch.ones(width, device=device, dtype=torch.float32, requires_grad=True)
            ms = torch.ones(width, device=device, dtype=torch.float32, requires_grad=True)
            mergers[key] = (mc, ms)
        parts[key] = (
            None if fc is None else Part.from_factors(fc, device, dtype, mc),
            None if fs is None else Part.from_factors(fs, device, dtype, ms),
        )
    return parts, mergers


def _movement(mergers: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]) -> MergerMovement:
    if not mergers:
        return MergerMovement(0.0, 0.0, 0.0, 0.0)
    mc = torch.cat([m[0].detach().float().flatten().cpu() for m in mergers.values()])
    ms = torch.cat([m[1].detach().float().flatten().cpu() for m in mergers.values()])
    return MergerMovement(
        float((mc - 1).abs().mean()),
        float((ms - 1).abs().mean()),
        float((mc.abs() < 0.1).float().mean()),
        float((ms.abs() < 0.1).float().mean()),
    )


@torch.no_grad()
def _per_layer_cos(mergers: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]) -> dict[LayerKey, float]:
    return {k: float(layer_similarity(c.float(), s.float(), "cos")) for k, (c, s) in mergers.items()}


def optimize_mergers(
    predict: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor],
    patches: PatchSet,
    mergers: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]],
    inputs: TrainingInputs,
    options: ZipOptions,
    progress: Progress,
    encode: Callable[[list[str]], Cond] | None = None,
) -> ZipResult:
    """Learn the mergers; each step holds one content state and one style state in one batch.

    ``encode`` is given when text-encoder layers are merged: the prompts are then encoded through the
    merged encoders at every step, so their mergers learn too.
    """
    t0 = time.perf_counter()
    pairs = list(mergers.values())
    cos_before = _per_layer_cos(mergers)
    params = [p for pair in pairs for p in pair]
    history: list[StepRecord] = []
    stop_reason = "step limit"
    steps_run = 0
    if not params:
        stop_reason = "no layer is touched by both LoRAs: nothing to learn"
        progress.begin_stage("Optimising the mergers", 0)
    else:
        opt = torch.optim.Adam(params, lr=options.lr)
        gen = torch.Generator().manual_seed(options.seed)
        progress.begin_stage("Optimising the mergers", options.steps)
        patches.set_mode("merged")
        c, s = inputs.content, inputs.style
        for step in range(options.steps):
            if progress.interrupted():
                raise JobInterrupted("interrupted while optimising; nothing was written")
            ci = torch.randint(len(c), (1,), generator=gen)
            si = torch.randint(len(s), (1,), generator=gen)
            xc, tc, yc, cc = c.batch(ci.to(c.x_t.device))
            xs, ts, ys, cs = s.batch(si.to(s.x_t.device))
            if encode is not None:
                cc, cs = encode([c.prompt]), encode([s.prompt])
            with torch.enable_grad():
                pred = predict(torch.cat([xc, xs]), torch.cat([tc, ts]), cond_cat([cc, cs]))
                loss_c = reconstruction(pred[:1], yc, options.reduction)
                loss_s = reconstruction(pred[1:], ys, options.reduction)
                sim = similarity_term(pairs, options.similarity)
                loss = loss_c + loss_s + options.lam * sim
            total = float(loss.detach())
            if not math.isfinite(total):
                precision = str(pred.dtype).replace("torch.", "")
                raise NonFiniteLoss(f"the loss became {total} at step {step + 1} ({precision} overflow)", pred.dtype)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps_run = step + 1
            mean_cos = mean_abs_cos(pairs)
            rec = StepRecord(steps_run, float(loss_c.detach()), float(loss_s.detach()), float(sim.detach()), total, mean_cos)
            history.append(rec)
            progress.record(rec)
            progress.advance(steps_run, f"loss {total:.4g}, mean |cos| {mean_cos:.3f}")
            if mean_cos < options.stop_similarity:
                stop_reason = f"mean |cos(m_c, m_s)| fell below {options.stop_similarity}"
                break
    out = {k: (c_.detach().float().cpu().clone(), s_.detach().float().cpu().clone()) for k, (c_, s_) in mergers.items()}
    return ZipResult(
        mergers=out,
        history=history,
        cos_before=cos_before,
        cos_after=_per_layer_cos(mergers),
        movement=_movement(mergers),
        steps_run=steps_run,
        stop_reason=stop_reason,
        seconds=time.perf_counter() - t0,
        forms=patches.form_counts(),
    )
