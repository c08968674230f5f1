"""Pass 2 of a write: each layer's tensors, produced in file order while the file is written.

Layers are merged as their first tensor is written and dropped after their last, so memory stays at one layer
plus the file buffers. Every layer is written with the same alpha; each layer's remaining scale is folded into
its up matrix (A1111 multiplies by alpha / dim). A layer planned in full form is written as its dense delta and
bias delta (``diff``, ``diff_b``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ziplora.errors import JobFailed, JobInterrupted
from ziplora.export.layer_merge import MergedLayer, merge_layer
from ziplora.export.options import ExportOptions, LayerReport, Mergers
from ziplora.export.plan import WritePlan
from ziplora.formats.keys import LayerKey, kohya_name
from ziplora.formats.lorafile import LoraFile
from ziplora.formats.safetensors_io import PendingTensor

__all__ = ["LayerStream"]


class LayerStream:
    """The pending tensors of every layer, and what writing them reported (per layer, and the error sums)."""

    def __init__(
        self,
        content: LoraFile,
        style: LoraFile,
        mergers: Mergers | None,
        options: ExportOptions,
        plan: WritePlan,
        should_stop: Callable[[], bool] | None = None,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> None:
        self.content, self.style, self.mergers, self.options, self.plan = content, style, mergers, options, plan
        self.should_stop, self.on_layer = should_stop, on_layer
        self.reports: list[LayerReport] = []
        self.norm2 = 0.0
        self.err2 = 0.0
        self._current: dict[LayerKey, MergedLayer] = {}

    def tensors(self, key: LayerKey) -> list[PendingTensor]:
        """One layer's tensors as the header lists them: down (mid), up, and alpha last; or diff, then diff_b."""
        name, dt = kohya_name(key), self.options.dtype
        p = self.plan.layers[key]
        out_dim, in_dim, *kernel = p.shape
        if p.full:
            return [
                PendingTensor(f"{name}.diff", dt, p.shape, self._producer(key, "diff")),
                PendingTensor(f"{name}.diff_b", dt, (out_dim,), self._producer(key, "diff_b")),
            ]
        conv = len(kernel) == 2
        pending = []
        if p.core is not None:
            pending.append(PendingTensor(f"{name}.lora_down.weight", dt, (p.rank, in_dim, 1, 1), self._producer(key, "down")))
            pending.append(PendingTensor(f"{name}.lora_mid.weight", dt, (p.core, p.rank, *kernel), self._producer(key, "mid")))
            up_rank = p.core
        else:
            down_shape = (p.rank, in_dim, *kernel) if conv else (p.rank, in_dim)
            pending.append(PendingTensor(f"{name}.lora_down.weight", dt, down_shape, self._producer(key, "down")))
            up_rank = p.rank
        up_shape = (out_dim, up_rank, 1, 1) if conv else (out_dim, up_rank)
        pending.append(PendingTensor(f"{name}.lora_up.weight", dt, up_shape, self._producer(key, "up")))
        pending.append(PendingTensor(f"{name}.alpha", dt, (), self._producer(key, "alpha")))
        return pending

    def _layer(self, key: LayerKey) -> MergedLayer:
        res = self._current.get(key)
        if res is None:
            if self.should_stop is not None and self.should_stop():
                raise JobInterrupted("interrupted while writing the file; nothing was written")
            res = self.plan.computed.pop(key, None) or merge_layer(
                key, self.content, self.style, self.mergers, self.options, self.plan.need_norms
            )
            self._current.clear()
            self._current[key] = res
        return res

    def _producer(self, key: LayerKey, part: str) -> Callable[[], torch.Tensor]:
        return lambda: self._produce(key, part)

    def _produce(self, key: LayerKey, part: str) -> torch.Tensor:
        res = self._layer(key)
        f = res.factors
        if part == "alpha":  # the layer's last tensor
            self._finish(res)
            return torch.tensor(self.plan.alpha, dtype=self.options.dtype)
        if part == "diff":
            t = f.dense().reshape(self.plan.layers[key].shape)
        elif part == "diff_b":
            t = f.bias  # type: ignore[assignment]
        elif part == "down":
            t = f.down.reshape(*f.down.shape, 1, 1) if f.mid is not None else f.down
        elif part == "mid":
            t = f.mid  # type: ignore[assignment]
        else:
            t = f.up * (f.dim / self.plan.alpha)  # A1111 multiplies by alpha / dim: fold the rest in here
            t = t.reshape(*t.shape, 1, 1) if len(f.shape) == 4 else t
        written = t.to(self.options.dtype).contiguous()
        if not bool(torch.isfinite(written).all()):
            raise JobFailed(f"layer {key.path}: values overflow {str(self.options.dtype).replace('torch.', '')}; write in float32 instead")
        if part == "diff_b":  # the last tensor of a layer in full form
            self._finish(res)
        return written

    def _finish(self, res: MergedLayer) -> None:
        self.reports.append(res.report)
        self.norm2 += res.norm2
        self.err2 += res.err2
        self._current.clear()
        if self.on_layer is not None:
            self.on_layer(len(self.reports), len(self.plan.layers))
