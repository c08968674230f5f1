"""The ZipLoRA optimisation: merger vectors, Adam at the paper's settings, and the result object."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ziplora.errors import JobFailed, JobInterrupted
from ziplora.formats.factors import Factors
from ziplora.formats.keys import LayerKey
from ziplora.inputs import TrainingInputs
from ziplora.merge.loss import layer_similarities, zip_loss
from ziplora.merge.patch import MergerView, Part, PatchSet
from ziplora.progress import Progress, StepRecord
from ziplora.schedule import Cond, cond_cat

log = logging.getLogger(__name__)

__all__ = ["ZipOptions", "ZipResult", "MergerMovement", "MergerBank", "NonFiniteLoss", "build_parts", "optimize_mergers"]


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
    capture: str = "auto"  # "auto": capture the step in a CUDA graph where possible; "off": always eager


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
    step_mode: str = "eager"  # "cuda graph" or "eager" (and why)
    # the paper's Fig. 3 in spirit: per layer, |cos| between the content and the style deltas as merged
    # (Frobenius inner product of m_c ⊙ ΔW_c and m_s ⊙ ΔW_s); "before" is the direct merge (m = 1)
    overlap_before: dict[LayerKey, float] = field(default_factory=dict)
    overlap_after: dict[LayerKey, float] = field(default_factory=dict)

    @property
    def final_similarity(self) -> float:
        return sum(self.cos_after.values()) / max(1, len(self.cos_after))

    @property
    def initial_similarity(self) -> float:
        return sum(self.cos_before.values()) / max(1, len(self.cos_before))


class MergerBank:
    """Every merger vector of a job in two flat fp32 leaves (m_c and m_s), with per-layer slices.

    Keeps Adam to two parameters and makes the similarity term and the stop criterion segment sums.
    """

    def __init__(self, widths: dict[LayerKey, int], device: torch.device) -> None:
        self.keys = list(widths)
        self.offsets: dict[LayerKey, tuple[int, int]] = {}
        start = 0
        segments = []
        for i, key in enumerate(self.keys):
            self.offsets[key] = (start, start + widths[key])
            segments.append(torch.full((widths[key],), i, dtype=torch.long))
            start += widths[key]
        self.total = start
        self.m_c = torch.ones(start, device=device, dtype=torch.float32, requires_grad=True)
        self.m_s = torch.ones(start, device=device, dtype=torch.float32, requires_grad=True)
        self.segment = (torch.cat(segments) if segments else torch.zeros(0, dtype=torch.long)).to(device)

    def __len__(self) -> int:
        return len(self.keys)

    def views(self, key: LayerKey) -> tuple[MergerView, MergerView]:
        a, b = self.offsets[key]
        return MergerView(self.m_c, a, b), MergerView(self.m_s, a, b)

    def params(self) -> list[torch.Tensor]:
        return [self.m_c, self.m_s] if self.keys else []

    def similarity(self, kind: str) -> torch.Tensor:
        """Σ over layers of |m_c·m_s| ("dot") or |cos(m_c, m_s)| ("cos"), differentiable (the loss's term)."""
        return layer_similarities(self.m_c, self.m_s, self.segment, len(self.keys), kind).sum()

    @torch.no_grad()
    def layer_cos(self) -> torch.Tensor:
        """Per-layer |cos(m_c, m_s)| (the stop criterion and the report)."""
        return layer_similarities(self.m_c, self.m_s, self.segment, len(self.keys), "cos")

    @torch.no_grad()
    def per_layer_cos(self) -> dict[LayerKey, float]:
        return dict(zip(self.keys, self.layer_cos().cpu().tolist()))

    @torch.no_grad()
    def to_dict(self) -> dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]:
        mc, ms = self.m_c.detach().float().cpu(), self.m_s.detach().float().cpu()
        return {k: (mc[a:b].clone(), ms[a:b].clone()) for k, (a, b) in self.offsets.items()}


def build_parts(
    factors: dict[LayerKey, tuple[Factors | None, Factors | None]],
    device: torch.device,
    dtype: torch.dtype,
    trainable: Callable[[LayerKey], bool] = lambda key: True,
) -> tuple[dict[LayerKey, tuple[Part | None, Part | None]], MergerBank]:
    """Parts on the device, and the merger bank (all ones) for every trainable layer both sources touch."""
    widths = {key: fc.shape[1] for key, (fc, fs) in factors.items() if fc is not None and fs is not None and trainable(key)}
    bank = MergerBank(widths, device)
    parts: dict[LayerKey, tuple[Part | None, Part | None]] = {}
    for key, (fc, fs) in factors.items():
        mc, ms = bank.views(key) if key in widths else (None, None)
        parts[key] = (
            None if fc is None else Part.from_factors(fc, device, dtype, mc),
            None if fs is None else Part.from_factors(fs, device, dtype, ms),
        )
    return parts, bank


def _movement(mergers: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]) -> MergerMovement:
    if not mergers:
        return MergerMovement(0.0, 0.0, 0.0, 0.0)
    mc = torch.cat([m[0].flatten() for m in mergers.values()])
    ms = torch.cat([m[1].flatten() for m in mergers.values()])
    return MergerMovement(
        float((mc - 1).abs().mean()),
        float((ms - 1).abs().mean()),
        float((mc.abs() < 0.1).float().mean()),
        float((ms.abs() < 0.1).float().mean()),
    )


def _merged_factors(part: Part, merger: torch.Tensor | None) -> Factors:
    """A part's delta as merged (fp32, Tucker core folded in, then the merger on the input columns)."""
    f = Factors(part.up, part.down, part.mid).float().conventional()
    return f if merger is None else f.scale_inputs(merger.float())


@torch.no_grad()
def delta_overlap(patches: PatchSet, bank: MergerBank, with_mergers: bool) -> dict[LayerKey, float]:
    """|cos| between the two sources' deltas per merged layer, from the factors (no dense matrices)."""
    out = {}
    for key in bank.keys:
        layer = patches.layers[key]
        if layer.content is None or layer.style is None:
            continue
        mc, ms = (v() for v in bank.views(key)) if with_mergers else (None, None)
        fc, fs = _merged_factors(layer.content, mc), _merged_factors(layer.style, ms)
        out[key] = abs(fc.inner(fs)) / max(1e-30, (fc.norm2() * fs.norm2()) ** 0.5)
    return out


class _Step:
    """One optimisation step: forward, loss, backward, Adam. Eager, or replayed from a CUDA graph.

    On CUDA the whole step is captured once (static input buffers, a capturable Adam) after a few eager
    warm-up steps, which removes the CPU launch overhead that dominates SDXL-sized steps; if capture fails
    for any reason the job goes on eagerly and says why.
    """

    WARMUP = 3

    def __init__(self, predict: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor], bank: MergerBank,
                 options: ZipOptions, device: torch.device) -> None:  # fmt: skip
        self.predict, self.bank, self.options = predict, bank, options
        self.want_graph = options.capture == "auto" and device.type == "cuda" and torch.cuda.is_available()
        self.opt = torch.optim.Adam(bank.params(), lr=options.lr, capturable=self.want_graph)
        self.mode = "eager" if not self.want_graph else "eager (warming up)"
        self.graph: object | None = None
        self.static: dict[str, object] = {}
        self.calls = 0

    def _eager(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, y: torch.Tensor) -> torch.Tensor:
        bank, o = self.bank, self.options
        with torch.enable_grad():
            pred = self.predict(x, t, cond)
            loss = zip_loss(pred, y, bank.m_c, bank.m_s, bank.segment, len(bank), lam=o.lam, similarity=o.similarity, reduction=o.reduction)
        self.opt.zero_grad(set_to_none=not self.want_graph)
        loss.total.backward()
        self.opt.step()
        self.dtype = pred.dtype
        return loss.detached()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            for name, value in (("x", x), ("t", t), ("y", y), *((f"c.{k}", v) for k, v in cond.items())):
                self.static[name].copy_(value)  # type: ignore[attr-defined]
            self.graph.replay()  # type: ignore[attr-defined]
            return self.static["out"].clone()  # type: ignore[attr-defined]
        if not self.want_graph:
            return self._eager(x, t, cond, y)
        if self.calls <= self.WARMUP:
            # warm-up on a side stream, as CUDA graph capture wants (cuBLAS / cuDNN workspaces, allocator)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._eager(x, t, cond, y)
            torch.cuda.current_stream().wait_stream(side)
            return out
        try:
            return self._capture(x, t, cond, y)
        except Exception as err:  # noqa: BLE001 - any capture failure means: go on eagerly
            log.warning("CUDA graph capture failed (%s); continuing eagerly", err)
            self.want_graph = False
            self.graph = None
            self.mode = f"eager (capture failed: {type(err).__name__})"
            return self._eager(x, t, cond, y)

    def _capture(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, y: torch.Tensor) -> torch.Tensor:
        static = {"x": x.clone(), "t": t.clone(), "y": y.clone(), **{f"c.{k}": v.clone() for k, v in cond.items()}}
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=False)
        with torch.cuda.graph(graph):
            static_cond = {k: static[f"c.{k}"] for k in cond}
            static["out"] = self._eager(static["x"], static["t"], static_cond, static["y"])  # type: ignore[arg-type]
        self.graph, self.static = graph, static
        self.mode = "cuda graph"
        graph.replay()
        return static["out"].clone()  # type: ignore[attr-defined]


def optimize_mergers(
    predict: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor],
    patches: PatchSet,
    bank: MergerBank,
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
    cos_before = bank.per_layer_cos()
    overlap_before = delta_overlap(patches, bank, with_mergers=False)
    history: list[StepRecord] = []
    stop_reason = "step limit"
    steps_run = 0
    if not len(bank):
        stop_reason = "no layer is touched by both LoRAs: nothing to learn"
        progress.begin_stage("Optimising the mergers", 0)
    else:
        device = bank.m_c.device
        step_fn = _Step(predict, bank, options, device)
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
                step_fn.want_graph = False  # prompts re-encoded through the merged encoders: not capturable
            before = (bank.m_c.detach().clone(), bank.m_s.detach().clone())
            parts = step_fn(torch.cat([xc, xs]), torch.cat([tc, ts]), cond_cat([cc, cs]), torch.cat([yc, ys])).tolist()
            loss_c, loss_s, sim, total = parts
            if not all(math.isfinite(v) for v in parts):
                with torch.no_grad():  # undo the step that saw the overflow, then stop
                    bank.m_c.copy_(before[0])
                    bank.m_s.copy_(before[1])
                dtype = getattr(step_fn, "dtype", torch.float32)
                precision = str(dtype).replace("torch.", "")
                raise NonFiniteLoss(f"the loss became {total} at step {step + 1} ({precision} overflow)", dtype)
            steps_run = step + 1
            mean_cos = float(bank.layer_cos().mean())
            rec = StepRecord(steps_run, loss_c, loss_s, sim, total, mean_cos)
            history.append(rec)
            progress.record(rec)
            progress.advance(steps_run, f"loss {total:.4g}, mean |cos| {mean_cos:.3f}")
            if mean_cos < options.stop_similarity:
                stop_reason = f"mean |cos(m_c, m_s)| fell below {options.stop_similarity}"
                break
    out = bank.to_dict()
    return ZipResult(
        mergers=out,
        history=history,
        cos_before=cos_before,
        cos_after=bank.per_layer_cos(),
        movement=_movement(out),
        steps_run=steps_run,
        stop_reason=stop_reason,
        seconds=time.perf_counter() - t0,
        forms=patches.form_counts(),
        step_mode=step_fn.mode if len(bank) else "none",
        overlap_before=overlap_before,
        overlap_after=delta_overlap(patches, bank, with_mergers=True),
    )
