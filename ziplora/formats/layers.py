"""Layer math: one small class per LoRA kind behind one interface.

Every kind gives its dense delta ``dense()`` (scale included) and, where one exists, an exact low-rank form
``exact_factors()`` (LoRA / LoCon / Tucker, LoHa as a rank r1*r2 LoRA). Kinds without one (LoKr, full diffs)
are factorised by SVD with the relative Frobenius error reported. The factors and their formulas are in
``ziplora.formats.factors``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import ClassVar

import torch

from ziplora.errors import LoraFormatError, UnsupportedLoraError
from ziplora.formats.factors import Factors, svd_factors, truncate_factors
from ziplora.formats.keys import LayerKey

__all__ = [
    "LayerSource",
    "LoraLayer",
    "LohaLayer",
    "LokrLayer",
    "FullLayer",
    "LAYER_KINDS",
    "make_layer",
]


def _rebuild_tucker(t: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    """A LyCORIS Tucker-decomposed factor (LoHa ``hada_t``, LoKr ``lokr_t2``) as one dense [out, in, kh, kw] tensor."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


class LayerSource(ABC):
    """One layer of one LoRA file: its tensors (already read) and its kind's math."""

    kind: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    optional: ClassVar[tuple[str, ...]] = ("alpha", "scale")

    def __init__(self, key: LayerKey, tensors: dict[str, torch.Tensor], label: str, target_shape: tuple[int, ...] | None = None) -> None:
        self.key = key
        self.label = label  # "<file>: <layer>" for messages
        self.target_shape = target_shape  # the module's weight shape, where known
        self._kernel = tuple(target_shape[2:]) if target_shape and len(target_shape) == 4 else ()
        unknown = set(tensors) - set(self.required) - set(self.optional)
        if unknown:
            raise LoraFormatError(f"{label}: unexpected tensors {sorted(unknown)} for a {self.kind} layer")
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LoraFormatError(f"{label}: tensor {name} holds NaN or Inf values")
        self.t = tensors
        self._check()

    @classmethod
    def matches(cls, suffixes: set[str]) -> bool:
        return set(cls.required) <= suffixes

    def _fail(self, why: str) -> LoraFormatError:
        return LoraFormatError(f"{self.label}: {why}")

    def _scalar(self, name: str) -> float | None:
        t = self.t.get(name)
        if t is None:
            return None
        if t.numel() != 1:
            raise self._fail(f"{name} must be a single number, got shape {list(t.shape)}")
        return float(t.float().reshape(()))

    def scale(self) -> float:
        """A1111's ``calc_scale``: the ``scale`` tensor, else alpha / rank, else 1."""
        scale = self._scalar("scale")
        if scale is not None:
            return scale
        alpha, dim = self._scalar("alpha"), self.dim()
        if alpha is not None and dim:
            return alpha / dim
        return 1.0

    def dim(self) -> int | None:
        return None

    @abstractmethod
    def _check(self) -> None: ...

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """The delta's shape: (out, in) or (out, in, kh, kw)."""

    @abstractmethod
    def dense(self) -> torch.Tensor: ...

    def exact_factors(self) -> Factors | None:
        return None

    @property
    def nominal_rank(self) -> int | None:
        return self.dim()

    def bias_delta(self) -> torch.Tensor | None:
        """A delta for the layer's bias ([out], fp32), for kinds that carry one; None for the rest."""
        return None

    def factors(self, max_rank: int | None = None) -> tuple[Factors, float, str]:
        """(factors, relative error, how): exact when this kind has an exact form, else by SVD; with the bias delta."""
        exact = self.exact_factors()
        if exact is not None and (max_rank is None or exact.rank <= max_rank):
            f, err, how = exact, 0.0, "exact"
        elif exact is not None:
            f, err = truncate_factors(exact, max_rank)  # type: ignore[arg-type]
            how = "svd"
        else:
            f, err = svd_factors(self.dense(), max_rank)
            how = "svd"
        bias = self.bias_delta()
        return (f if bias is None else replace(f, bias=bias)), err, how


class LoraLayer(LayerSource):
    """kohya LoRA / LoCon (conv kernels in ``lora_down``), with an optional Tucker ``lora_mid``."""

    kind = "lora"
    required = ("lora_down", "lora_up")
    optional = ("alpha", "scale", "lora_mid")

    def _check(self) -> None:
        up, down, mid = self.t["lora_up"], self.t["lora_down"], self.t.get("lora_mid")
        if up.dim() not in (2, 4) or down.dim() not in (2, 4):
            raise self._fail(f"lora_up {list(up.shape)} / lora_down {list(down.shape)} are not Linear or conv factors")
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise self._fail(f"lora_up must be a 1x1 kernel, got {list(up.shape)}")
        rank_up = up.shape[1]
        rank_down = down.shape[0] if mid is None else mid.shape[0]
        if mid is not None:
            if mid.dim() != 4 or mid.shape[1] != down.shape[0]:
                raise self._fail(f"lora_mid {list(mid.shape)} does not fit lora_down {list(down.shape)}")
            if down.dim() == 4 and down.shape[2:] != (1, 1):
                raise self._fail("with lora_mid, lora_down must be a 1x1 kernel")
        if rank_up != rank_down:
            raise self._fail(f"mismatched shapes: lora_up {list(up.shape)} and lora_down {list(down.shape)} ranks differ")
        if rank_up == 0:
            raise self._fail("rank 0 layer")

    def dim(self) -> int:
        return int(self.t["lora_down"].shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        up, down, mid = self.t["lora_up"], self.t["lora_down"], self.t.get("lora_mid")
        kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:]) if down.dim() == 4 else ()
        natural = (int(up.shape[0]), int(down.shape[1]), *kernel)
        return _conform(natural, self.target_shape)

    def exact_factors(self) -> Factors:
        up = self.t["lora_up"].float().reshape(self.t["lora_up"].shape[0], -1) * self.scale()
        down, mid = self.t["lora_down"].float(), self.t.get("lora_mid")
        if mid is not None:
            return Factors(up, down.reshape(down.shape[0], -1), mid.float())
        shape = self.shape
        return Factors(up, down.reshape(down.shape[0], *shape[1:]))

    def dense(self) -> torch.Tensor:
        return self.exact_factors().dense()


class LohaLayer(LayerSource):
    """LyCORIS LoHa: (w1a @ w1b) ⊙ (w2a @ w2b); exact as a LoRA of rank r1*r2 (no Tucker cores)."""

    kind = "loha"
    required = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    optional = ("alpha", "scale", "hada_t1", "hada_t2")

    def _check(self) -> None:
        w1a, w1b, w2a, w2b = (self.t[k] for k in self.required)
        for name, dims in (("hada_w1_a", (2,)), ("hada_w2_a", (2,)), ("hada_w1_b", (2, 4)), ("hada_w2_b", (2, 4)),
                           ("hada_t1", (4,)), ("hada_t2", (4,))):  # fmt: skip
            if name in self.t and self.t[name].dim() not in dims:
                raise self._fail(f"{name} of shape {list(self.t[name].shape)} is not a LoHa factor")
        t1, t2 = self.t.get("hada_t1"), self.t.get("hada_t2")
        if (t1 is None) != (t2 is None):
            raise self._fail("a Tucker core (hada_t1/hada_t2) on one Hadamard factor only")
        if t1 is not None and t2 is not None:
            # rebuilt as einsum("ijkl,jr,ip->prkl", t, w_b, w_a): the cores' first two sizes are the factors' ranks
            for t, a, b in ((t1, w1a, w1b), (t2, w2a, w2b)):
                if b.dim() != 2 or t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
                    raise self._fail(f"mismatched shapes: Tucker core {list(t.shape)} with {list(a.shape)} and {list(b.shape)}")
            if (w1a.shape[1], w1b.shape[1], *t1.shape[2:]) != (w2a.shape[1], w2b.shape[1], *t2.shape[2:]):
                raise self._fail("mismatched shapes: the two Hadamard factors have different outer sizes")
        if t1 is None and t2 is None:
            if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
                raise self._fail(f"mismatched shapes: hada w1 {list(w1a.shape)}x{list(w1b.shape)}, w2 {list(w2a.shape)}x{list(w2b.shape)}")
            if w1a.shape[0] != w2a.shape[0] or w1b.reshape(w1b.shape[0], -1).shape[1] != w2b.reshape(w2b.shape[0], -1).shape[1]:
                raise self._fail("mismatched shapes: the two Hadamard factors have different outer sizes")

    def dim(self) -> int:
        return int(self.t["hada_w1_b"].shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        if self.t.get("hada_t1") is not None:
            t1 = self.t["hada_t1"]
            return (int(self.t["hada_w1_a"].shape[1]), int(self.t["hada_w1_b"].shape[1]), *t1.shape[2:])
        w1b = self.t["hada_w1_b"]
        if w1b.dim() == 4:
            return (int(self.t["hada_w1_a"].shape[0]), int(w1b.shape[1]), *w1b.shape[2:])
        k = 1
        for d in self._kernel:
            k *= d
        return (int(self.t["hada_w1_a"].shape[0]), int(w1b.shape[1]) // k, *self._kernel)

    def _half(self, a: str, b: str, t: str) -> torch.Tensor:
        wa, wb, tt = self.t[a].float(), self.t[b].float(), self.t.get(t)
        if tt is not None:
            return _rebuild_tucker(tt.float(), wb, wa)
        return (wa @ wb.reshape(wb.shape[0], -1)).reshape(self.shape)

    def dense(self) -> torch.Tensor:
        return self._half("hada_w1_a", "hada_w1_b", "hada_t1") * self._half("hada_w2_a", "hada_w2_b", "hada_t2") * self.scale()

    @property
    def nominal_rank(self) -> int:
        return int(self.t["hada_w1_b"].shape[0] * self.t["hada_w2_b"].shape[0])

    def exact_factors(self) -> Factors | None:
        if self.t.get("hada_t1") is not None or self.t.get("hada_t2") is not None:
            return None
        shape = self.shape
        if self.nominal_rank >= min(shape[0], shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)):
            return None  # the exact form is no smaller than the dense delta: use the SVD
        w1a, w2a = self.t["hada_w1_a"].float(), self.t["hada_w2_a"].float()
        w1b = self.t["hada_w1_b"].float().reshape(w1a.shape[1], -1)
        w2b = self.t["hada_w2_b"].float().reshape(w2a.shape[1], -1)
        up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1) * self.scale()
        down = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
        return Factors(up, down.reshape(down.shape[0], *shape[1:]))


class LokrLayer(LayerSource):
    """LyCORIS LoKr: kron(w1, w2), each side full or low-rank (w2 optionally Tucker)."""

    kind = "lokr"
    required = ()
    optional = ("alpha", "scale", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    @classmethod
    def matches(cls, suffixes: set[str]) -> bool:
        has1 = "lokr_w1" in suffixes or {"lokr_w1_a", "lokr_w1_b"} <= suffixes
        has2 = "lokr_w2" in suffixes or {"lokr_w2_a", "lokr_w2_b"} <= suffixes
        return has1 and has2

    def _check(self) -> None:
        if not self.matches(set(self.t)):
            raise self._fail("incomplete LoKr layer")
        for name, t in self.t.items():
            dims = {"lokr_w2": (2, 4), "lokr_w2_b": (2, 4), "lokr_t2": (4,), "alpha": None, "scale": None}.get(name, (2,))
            if dims is not None and t.dim() not in dims:
                raise self._fail(f"{name} of shape {list(t.shape)} is not a LoKr factor")
        t2 = self.t.get("lokr_t2")
        if t2 is not None and "lokr_w2_a" in self.t:
            a, b = self.t["lokr_w2_a"], self.t["lokr_w2_b"]
            if b.dim() != 2 or t2.shape[0] != a.shape[0] or t2.shape[1] != b.shape[0]:
                raise self._fail(f"mismatched shapes: lokr_t2 {list(t2.shape)}, lokr_w2_a {list(a.shape)}, lokr_w2_b {list(b.shape)}")
        for a, b in (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")):
            if a in self.t and self.t.get("lokr_t2") is None and self.t[a].shape[1] != self.t[b].shape[0]:
                raise self._fail(f"mismatched shapes: {a} {list(self.t[a].shape)} and {b} {list(self.t[b].shape)}")

    def dim(self) -> int | None:
        # A1111 network_lokr: the rank of w2 when decomposed, else of w1
        if "lokr_w2_b" in self.t:
            return int(self.t["lokr_w2_b"].shape[0])
        if "lokr_w1_b" in self.t:
            return int(self.t["lokr_w1_b"].shape[0])
        return None

    def _w1(self) -> torch.Tensor:
        if "lokr_w1" in self.t:
            return self.t["lokr_w1"].float()
        return self.t["lokr_w1_a"].float() @ self.t["lokr_w1_b"].float()

    def _w2(self) -> torch.Tensor:
        if "lokr_w2" in self.t:
            return self.t["lokr_w2"].float()
        a, b = self.t["lokr_w2_a"].float(), self.t["lokr_w2_b"].float()
        if "lokr_t2" in self.t:
            return _rebuild_tucker(self.t["lokr_t2"].float(), b, a)
        return a @ b.reshape(b.shape[0], -1)

    @property
    def shape(self) -> tuple[int, ...]:
        w1, w2 = self._w1(), self._w2()
        out, inn = w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]
        if w2.dim() == 4:
            return (out, inn, *w2.shape[2:])
        if self._kernel:
            k = 1
            for d in self._kernel:
                k *= d
            return (out, inn // k, *self._kernel)
        return (out, inn)

    def dense(self) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).reshape(self.shape) * self.scale()


class FullLayer(LayerSource):
    """A dense delta (``diff``) with an optional bias delta (``diff_b``), as LyCORIS' full kind writes them.

    A1111 (``network_full``) and Forge (``diff`` patches on the weight and on the bias) add ``diff_b`` to the
    layer's bias times the LoRA's multiplier, and never times ``scale``; so does :meth:`bias_delta`.
    """

    kind = "full"
    required = ("diff",)
    optional = ("diff_b", "alpha", "scale")

    def _check(self) -> None:
        diff, bias = self.t["diff"], self.t.get("diff_b")
        if diff.dim() not in (2, 4):
            raise self._fail(f"diff of shape {list(diff.shape)} is not a Linear or conv weight delta")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != diff.shape[0]):
            raise self._fail(f"diff_b of shape {list(bias.shape)} is not a bias delta for its {diff.shape[0]} output rows")

    def scale(self) -> float:
        scale = self._scalar("scale")
        return 1.0 if scale is None else scale

    @property
    def shape(self) -> tuple[int, ...]:
        return _conform(tuple(int(d) for d in self.t["diff"].shape), self.target_shape)

    def dense(self) -> torch.Tensor:
        return self.t["diff"].float() * self.scale()

    def bias_delta(self) -> torch.Tensor | None:
        bias = self.t.get("diff_b")
        return None if bias is None else bias.float()


LAYER_KINDS: tuple[type[LayerSource], ...] = (LoraLayer, LohaLayer, LokrLayer, FullLayer)

_REFUSED = {
    "dora_scale": "DoRA (dora_scale) layers are not supported yet; merge a plain LoRA/LoCon/LoHa/LoKr instead",
    "oft_blocks": "OFT layers are not supported (their delta is multiplicative)",
    "oft_diag": "OFT layers are not supported (their delta is multiplicative)",
    "ia3_weight": "IA3 layers are not supported (their delta is multiplicative)",
    "on_input": "IA3 layers are not supported (their delta is multiplicative)",
    "glora_a1": "GLoRA layers are not supported",
    "w_norm": "norm-layer LoRA tensors (w_norm/b_norm) are not supported",
    "b_norm": "norm-layer LoRA tensors (w_norm/b_norm) are not supported",
    "bias": "LoRA bias tensors are not supported",
}


def _conform(natural: tuple[int, ...], target: tuple[int, ...] | None) -> tuple[int, ...]:
    """A 1x1-conv-shaped delta on a Linear (or the reverse) takes the module's own shape, as A1111 does."""
    if target is None or natural == target:
        return natural
    n_natural = n_target = 1
    for d in natural:
        n_natural *= d
    for d in target:
        n_target *= d
    if n_natural == n_target and natural[:2] == target[:2]:
        return target
    return natural


def make_layer(key: LayerKey, tensors: dict[str, torch.Tensor], label: str, target_shape: tuple[int, ...] | None = None) -> LayerSource:
    """Pick the kind by the tensors present (registry order); a clear error names what was found."""
    suffixes = set(tensors)
    for suffix, why in _REFUSED.items():
        if suffix in suffixes:
            raise UnsupportedLoraError(f"{label}: {why}")
    for kind in LAYER_KINDS:
        if kind.matches(suffixes):
            return kind(key, tensors, label, target_shape)
    tried = ", ".join(k.kind for k in LAYER_KINDS)
    raise LoraFormatError(f"{label}: no LoRA kind matches tensors {sorted(suffixes)} (tried {tried})")
