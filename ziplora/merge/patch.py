"""Patching the host's Linear / conv modules for a job, and putting them back exactly.

Each targeted module is swapped, in its parent, for a ``ZipLayer`` that holds the original and both
sources' factors. One switch (``PatchSet.set_mode``) turns every layer into the content teacher, the style
teacher, the merged student or the bare base model, so one patch serves the whole job. Two forms:

- fused: ``W_eff = W0 + Σ up @ (down * m)`` and one matmul/conv (fast where W0 is a plain tensor);
- side path: ``base(x) + Σ up(down(m * x))`` (any base layer, including quantised ones).

Layers are recognised by what they are (a 2-D or 4-D ``weight``), not by class: Forge's Linear is no
``nn.Linear``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ziplora.errors import HostError
from ziplora.formats.factors import Factors, low_rank_delta, scale_input_columns
from ziplora.formats.keys import LayerKey

log = logging.getLogger(__name__)

__all__ = ["Part", "ZipLayer", "PatchSet", "patch_layers", "MODES", "layer_geometry", "can_fuse"]

MODES = ("merged", "content", "style", "base")


class MergerView:
    """One layer's merger vector: a fresh slice of a flat fp32 parameter at every use.

    All mergers of a job live in two flat tensors (``MergerBank``), so Adam, the similarity term and the
    stop criterion are a few kernels, not thousands; slicing anew each forward keeps autograd simple.
    """

    __slots__ = ("flat", "start", "stop")

    def __init__(self, flat: torch.Tensor, start: int, stop: int) -> None:
        self.flat, self.start, self.stop = flat, start, stop

    def __call__(self) -> torch.Tensor:
        return self.flat[self.start : self.stop]


@dataclass
class Part:
    """One source's factors on the job's device and dtype, and its merger (None: fixed at 1)."""

    up: torch.Tensor  # [out, r]
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]; with mid: [r', in]
    mid: torch.Tensor | None
    merger: MergerView | None  # fp32 [in], learned during optimisation
    bias: torch.Tensor | None = None  # [out]: a bias delta (``diff_b``), added as it is; mergers do not touch it

    @staticmethod
    def from_factors(f: Factors, device: torch.device, dtype: torch.dtype, merger: MergerView | None) -> Part:
        mid, bias = (None if t is None else t.to(device, dtype) for t in (f.mid, f.bias))
        return Part(f.up.to(device, dtype), f.down.to(device, dtype), mid, merger, bias)

    def scaled_down(self, x_dtype: torch.dtype, use_merger: bool) -> torch.Tensor:
        down = self.down if self.down.dtype == x_dtype else self.down.to(x_dtype)
        if use_merger and self.merger is not None:
            down = scale_input_columns(down, self.merger().to(x_dtype))
        return down

    def delta(self, dtype: torch.dtype, use_merger: bool) -> torch.Tensor:
        up = self.up if self.up.dtype == dtype else self.up.to(dtype)
        return low_rank_delta(up, self.scaled_down(dtype, use_merger), None if self.mid is None else self.mid.to(dtype))


def layer_geometry(module: nn.Module) -> str | None:
    """'linear' or 'conv' for a module with a plain 2-D / 4-D weight; None when it has none (quantised)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return None
    if weight.dim() == 2:
        return "linear"
    if weight.dim() == 4 and getattr(module, "groups", 1) == 1:
        return "conv"
    return None


def can_fuse(module: nn.Module, device: torch.device) -> bool:
    """A plain weight we can add to on the job's device (not fp8 / NF4 / GGUF storage, not offloaded)."""
    weight = getattr(module, "weight", None)
    return (
        layer_geometry(module) is not None
        and weight.dtype in (torch.float16, torch.bfloat16, torch.float32)  # type: ignore[union-attr]
        and weight.device == device  # type: ignore[union-attr]
        and getattr(module, "padding_mode", "zeros") == "zeros"
    )


class ZipLayer(nn.Module):
    """A targeted module during a job: the original plus both sources' parts, in one of ``MODES``."""

    def __init__(self, key: LayerKey, base: nn.Module, content: Part | None, style: Part | None, form: str, geometry: str) -> None:
        super().__init__()
        self.key = key
        self.base = base
        self.content = content
        self.style = style
        self.form = form  # fused | side
        self.geometry = geometry  # linear | conv
        self.mode = "merged"
        self._up_cat: torch.Tensor | None = None
        if content is not None and style is not None and content.mid is None and style.mid is None and form == "fused":
            # keep both up factors in one tensor and let the parts view into it: no extra memory
            self._up_cat = torch.cat([content.up, style.up], dim=1)
            r = content.up.shape[1]
            content.up, style.up = self._up_cat[:, :r], self._up_cat[:, r:]

    def _active(self) -> list[tuple[Part, bool]]:
        if self.mode == "merged":
            return [(p, True) for p in (self.content, self.style) if p is not None]
        if self.mode == "content":
            return [(self.content, False)] if self.content is not None else []
        if self.mode == "style":
            return [(self.style, False)] if self.style is not None else []
        return []

    # Forge and A1111 code sometimes read these off the module
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        active = self._active()
        if not active:
            return self.base(x, *args, **kwargs)
        if self.form == "fused":
            weight = self.base.weight
            w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
            if len(active) == 2 and self._up_cat is not None:
                # both sources in one matmul: [B_c | B_s] @ [A_c * m_c ; A_s * m_s]
                up = self._up_cat if self._up_cat.dtype == x.dtype else self._up_cat.to(x.dtype)
                down = torch.cat([p.scaled_down(x.dtype, m) for p, m in active])
                w = w + low_rank_delta(up, down)
            else:
                for part, use_merger in active:
                    w = w + part.delta(x.dtype, use_merger)
            bias = getattr(self.base, "bias", None)
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            for part, _ in active:
                if part.bias is not None:
                    bias = part.bias.to(x.dtype) if bias is None else bias + part.bias.to(x.dtype)
            if self.geometry == "linear":
                return F.linear(x, w, bias)
            b = self.base
            return F.conv2d(x, w, bias, b.stride, b.padding, b.dilation, b.groups)  # type: ignore[arg-type]
        y = self.base(x, *args, **kwargs)
        for part, use_merger in active:
            y = y + self._side(part, x, use_merger).to(y.dtype)
        return y

    def _side(self, part: Part, x: torch.Tensor, use_merger: bool) -> torch.Tensor:
        dtype = x.dtype
        up = part.up.to(dtype)
        m = part.merger().to(dtype) if use_merger and part.merger is not None else None
        bias = None if part.bias is None else part.bias.to(dtype)
        if self.geometry == "linear":
            h = x * m if m is not None else x
            return F.linear(F.linear(h, part.down.to(dtype)), up, bias)
        b = self.base
        h = x * m.reshape(1, -1, 1, 1) if m is not None else x
        if part.mid is not None:
            h = F.conv2d(h, part.down.to(dtype)[:, :, None, None])
            h = F.conv2d(h, part.mid.to(dtype), None, b.stride, b.padding, b.dilation)  # type: ignore[arg-type]
        else:
            h = F.conv2d(h, part.down.to(dtype), None, b.stride, b.padding, b.dilation)  # type: ignore[arg-type]
        return F.conv2d(h, up[:, :, None, None], bias)


class PatchSet:
    """The patched layers of one job."""

    def __init__(self, layers: dict[LayerKey, ZipLayer]) -> None:
        self.layers = layers
        self.mode = "merged"

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(mode)
        for layer in self.layers.values():
            layer.mode = mode
        self.mode = mode

    @contextmanager
    def mode_of(self, mode: str) -> Iterator[None]:
        previous = self.mode
        self.set_mode(mode)
        try:
            yield
        finally:
            self.set_mode(previous)

    def form_counts(self) -> dict[str, int]:
        return dict(Counter(layer.form for layer in self.layers.values()))


Resolver = Callable[[LayerKey], tuple[nn.Module, str]]


@contextmanager
def patch_layers(
    resolve: Resolver,
    parts: dict[LayerKey, tuple[Part | None, Part | None]],
    device: torch.device,
    form: str = "auto",
    fusable: Callable[[nn.Module], bool] | None = None,
) -> Iterator[PatchSet]:
    """Swap every targeted module for a ``ZipLayer``; always put the originals back, whatever happens.

    ``resolve(key)`` gives (parent module, attribute name). ``form`` is "fused", "side" or "auto" (fused
    where the weight allows it); ``fusable(module)`` lets the host veto the fused form per layer (Forge's
    fp8 / NF4 / GGUF layers). Raises ``HostError`` when a key names no Linear/conv or shapes differ.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    layers: dict[LayerKey, ZipLayer] = {}
    try:
        for key, (content, style) in parts.items():
            parent, attr = resolve(key)
            base = getattr(parent, attr)
            if isinstance(base, ZipLayer):
                raise HostError(f"{key.path} is already patched (a previous job did not finish)")
            geometry = layer_geometry(base)
            weight = getattr(base, "weight", None)
            quantised = geometry is None and _quantised_linear(base)
            if geometry is None and not quantised:
                raise HostError(f"{key} is not a Linear or conv layer this merge can patch ({type(base).__name__})")
            ref = content or style
            assert ref is not None
            if geometry is None:
                geometry = "linear"
            out_f = ref.up.shape[0]
            in_f = ref.down.shape[1]
            # a quantised weight's storage shape is not the layer's shape (NF4 packs it): ask the layer instead
            model_shape = (
                (int(base.out_features), int(base.in_features)) if quantised  # type: ignore[arg-type]
                else tuple(weight.shape[:2]) if isinstance(weight, torch.Tensor) and weight.dim() >= 2
                else None
            )  # fmt: skip
            if model_shape is not None and model_shape != (out_f, in_f):
                raise HostError(
                    f"{key.path}: the LoRA's delta is {out_f}x{in_f} but the model's layer is "
                    f"{model_shape[0]}x{model_shape[1]} (a LoRA for another model?)"
                )
            fuse_ok = fusable or (lambda m: can_fuse(m, device))
            chosen = form
            if form == "auto":
                chosen = "fused" if fuse_ok(base) else "side"
            elif form == "fused" and not (can_fuse(base, device) and fuse_ok(base)):
                chosen = "side"
            wrapper = ZipLayer(key, base, content, style, chosen, geometry)
            setattr(parent, attr, wrapper)
            swapped.append((parent, attr, base))
            layers[key] = wrapper
        yield PatchSet(layers)
    finally:
        for parent, attr, base in reversed(swapped):
            setattr(parent, attr, base)


def _quantised_linear(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features")
