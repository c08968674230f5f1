"""open_clip's fused ``nn.MultiheadAttention`` (A1111's second SDXL text encoder) seen as four ``Linear`` layers.

kohya files name bigG's projections ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``; A1111's
OpenCLIP has one fused ``in_proj_weight``. For the duration of a job the session swaps each block's ``attn`` for
:class:`MultiheadAttentionAsLinears` (see ``A1111Session.resolve``) and puts the MHA back when it closes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ziplora.errors import HostError

__all__ = ["MultiheadAttentionAsLinears"]


class MultiheadAttentionAsLinears(nn.Module):
    """open_clip's fused ``nn.MultiheadAttention`` as four ``Linear`` layers, for the duration of one job.

    kohya files name the second text encoder's projections ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` /
    ``out_proj``; A1111's OpenCLIP bigG has one ``in_proj_weight`` instead (A1111 adds a q/k/v LoRA to its
    thirds, networks.py ``network_apply_weights``). Here q/k/v are views of those thirds (no copy) and
    ``out_proj`` is the MHA's own, so patching them patches exactly what A1111 would, and the attention is
    computed from their outputs. The MHA itself is never modified.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not getattr(mha, "_qkv_same_embed_dim", False) or mha.bias_k is not None or mha.add_zero_attn:
            raise HostError(
                "the second text encoder's attention has an unusual layout (separate q/k/v widths or bias_k); cannot merge its layers"
            )
        d = mha.embed_dim
        self.embed_dim = d
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        weight = mha.in_proj_weight.detach()  # views share its storage; nothing here ever writes to them
        bias = None if mha.in_proj_bias is None else mha.in_proj_bias.detach()
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            linear = nn.Linear(d, d, bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(weight[i * d : (i + 1) * d], requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias[i * d : (i + 1) * d], requires_grad=False)
            setattr(self, name, linear)
        self.out_proj = mha.out_proj
        self.original = [mha]  # a list: not a submodule, so named_modules() shows the four projections only

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """``nn.MultiheadAttention.forward``'s signature; attention weights are never returned (open_clip
        asks for none)."""
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        length, batch, _ = query.shape
        source = key.shape[0]
        h = self.num_heads
        q = self.q_proj(query).reshape(length, batch, h, -1).permute(1, 2, 0, 3)
        k = self.k_proj(key).reshape(source, batch, h, -1).permute(1, 2, 0, 3)
        v = self.v_proj(value).reshape(source, batch, h, -1).permute(1, 2, 0, 3)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, h, length, source, q.dtype)
        causal = is_causal and mask is None
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, -1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.original[0].in_proj_weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.original[0].in_proj_bias


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    length: int,
    source: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """MHA's masks (bool: True = masked out; float: added) as one float mask for scaled_dot_product_attention."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        mask = m.reshape(batch, heads, length, source) if m.dim() == 3 else m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=k.device).masked_fill(k, float("-inf"))
        k = k.to(dtype).reshape(batch, 1, 1, source)
        mask = k if mask is None else mask + k
    return mask
