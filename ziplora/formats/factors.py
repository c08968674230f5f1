"""Low-rank deltas: the ``Factors`` of one layer and the formulas on them, each in one place.

``dW = up @ down`` (conv: ``einsum(up, [mid,] down)``) is :func:`low_rank_delta`; ZipLoRA's merger ``dW·diag(m)``
is :func:`scale_input_columns` on the down factor. The patched layers (``ziplora.merge.patch``), the
optimisation's diagnostics and the export all call these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Factors", "low_rank_delta", "scale_input_columns", "tucker_to_conventional", "svd_factors", "truncate_factors"]


def low_rank_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """The dense delta of factors: ``up @ down`` (Linear), over a kernel (conv), or through a Tucker core ``mid``."""
    if mid is not None:
        return torch.einsum("or,rskl,si->oikl", up, mid, down)
    if down.dim() == 4:
        return torch.einsum("or,rikl->oikl", up, down)
    return up @ down


def scale_input_columns(down: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``down · diag(m)``: each input column (a conv's input channel) of a down factor times its merger coefficient."""
    return down * m.reshape((1, -1) + (1,) * (down.dim() - 2))


def tucker_to_conventional(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Fold a Tucker core [r, r', kh, kw] into its 1x1 down factor [r', in]: a conventional down [r, in, kh, kw]."""
    return torch.einsum("rskl,si->rikl", mid, down)


@dataclass
class Factors:
    """An exact low-rank delta: ``dW = up @ down`` (conv: ``einsum(up, [mid,] down)``); scales folded in.

    Shapes: ``up`` [out, r]; ``down`` [r, in] for Linear, [r, in, kh, kw] for a conventional conv;
    with a Tucker core ``mid`` [r, r', kh, kw], ``down`` is [r', in] (a 1x1 conv). ``bias`` [out]: a bias delta
    the layer adds besides (a full layer's ``diff_b``); it scales with the output, never with the mergers.
    """

    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def kernel(self) -> tuple[int, ...]:
        if self.mid is not None:
            return tuple(self.mid.shape[2:])
        return tuple(self.down.shape[2:])

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), int(self.down.shape[1]), *self.kernel)

    def dense(self) -> torch.Tensor:
        return low_rank_delta(self.up.float(), self.down.float(), None if self.mid is None else self.mid.float())

    def inner(self, other: Factors) -> float:
        """Frobenius inner product of the two deltas, from the factors (trace of two r x r' products)."""
        a = self.conventional().float()
        b = a if other is self else other.conventional().float()
        da, db = a.down.reshape(a.rank, -1), b.down.reshape(b.rank, -1)
        return float(((a.up.T @ b.up) * (da @ db.T)).sum())

    def norm2(self) -> float:
        """Squared Frobenius norm of the delta, from the factors (trace of two r x r Gram matrices)."""
        return self.inner(self)

    @property
    def dim(self) -> int:
        """What A1111 divides alpha by: the rank of the down factor (the core's input rank with Tucker)."""
        return int(self.down.shape[0])

    def scale_inputs(self, m: torch.Tensor) -> Factors:
        """dW · diag(m): scale each input column (conv: each input channel)."""
        return Factors(self.up, scale_input_columns(self.down, m.to(self.down.dtype)), self.mid, self.bias)

    def scale_outputs(self, s: float | torch.Tensor) -> Factors:
        return Factors(self.up * s, self.down, self.mid, None if self.bias is None else self.bias * s)

    def conventional(self) -> Factors:
        """The same delta without a Tucker core (exact): down becomes [r, in, kh, kw]."""
        if self.mid is None:
            return self
        return Factors(self.up, tucker_to_conventional(self.mid.float(), self.down.float()), None, self.bias)

    def float(self) -> Factors:
        mid, bias = (None if t is None else t.float() for t in (self.mid, self.bias))
        return Factors(self.up.float(), self.down.float(), mid, bias)

    @staticmethod
    def concat(parts: list[Factors]) -> Factors:
        """One LoRA whose delta is the sum of the parts, exactly (rank = sum of ranks; bias deltas add)."""
        parts = [p.float() for p in parts]
        if len(parts) == 1:
            return parts[0]
        biases = [p.bias for p in parts if p.bias is not None]
        bias = sum(biases[1:], biases[0]) if biases else None
        cores = [p.mid for p in parts if p.mid is not None]
        if len(cores) == len(parts) and len({p.kernel for p in parts}) == 1:
            ranks_out = [c.shape[0] for c in cores]
            ranks_in = [c.shape[1] for c in cores]
            mid = torch.zeros(sum(ranks_out), sum(ranks_in), *parts[0].kernel)
            o = i = 0
            for c, ro, ri in zip(cores, ranks_out, ranks_in):
                mid[o : o + ro, i : i + ri] = c
                o, i = o + ro, i + ri
            return Factors(torch.cat([p.up for p in parts], 1), torch.cat([p.down for p in parts], 0), mid, bias)
        parts = [p.conventional() for p in parts]
        return Factors(torch.cat([p.up for p in parts], 1), torch.cat([p.down for p in parts], 0), None, bias)


def svd_factors(delta: torch.Tensor, max_rank: int | None = None, rtol: float = 1e-6) -> tuple[Factors, float]:
    """Factorise a dense delta; rank = ``max_rank`` or the numerical rank. Returns (factors, relative error)."""
    out = delta.shape[0]
    flat = delta.float().reshape(out, -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    total = float(s.square().sum())
    if total == 0.0:
        r = 1
    else:
        r = int((s > s[0] * rtol).sum())
        if max_rank is not None:
            r = min(r, max_rank)
        r = max(r, 1)
    err = float(s[r:].square().sum() / total) ** 0.5 if total > 0 else 0.0
    up = u[:, :r] * s[:r]
    down = vh[:r].reshape(r, *delta.shape[1:])
    return Factors(up, down), err


def truncate_factors(f: Factors, rank: int) -> tuple[Factors, float]:
    """Best rank-``rank`` approximation of a low-rank delta without forming it (QR of both sides); a bias delta stays."""
    f = f.conventional().float()
    if f.rank <= rank:
        return f, 0.0
    down2 = f.down.reshape(f.rank, -1)
    q1, r1 = torch.linalg.qr(f.up)
    q2, r2 = torch.linalg.qr(down2.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    total = float(s.square().sum())
    err = float(s[rank:].square().sum() / total) ** 0.5 if total > 0 else 0.0
    up = q1 @ (u[:, :rank] * s[:rank])
    down = (vh[:rank] @ q2.T).reshape(rank, *f.down.shape[1:])
    return Factors(up, down, None, f.bias), err
