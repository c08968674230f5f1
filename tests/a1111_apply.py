"""How A1111 v1.10.1 turns one module's LoRA tensors into a weight delta, re-derived for the tests.

Mirrors extensions-builtin/Lora: network_lora.NetworkModuleLora.calc_updown (with lyco_helpers
.rebuild_conventional / .rebuild_cp_decomposition), network_hada.NetworkModuleHada.calc_updown,
network_lokr, network_full, and network.NetworkModule.calc_scale / finalize_updown (scale = alpha / dim,
dim = lora_down.shape[0] / hada_w1_b.shape[0]; times the multiplier).
"""

from __future__ import annotations

import torch


def _scale(w: dict[str, torch.Tensor], dim: int | None) -> float:
    if "scale" in w:
        return float(w["scale"])
    if "alpha" in w and dim:
        return float(w["alpha"]) / dim
    return 1.0


def a1111_delta(w: dict[str, torch.Tensor], weight_shape: tuple[int, ...], multiplier: float = 1.0) -> torch.Tensor:
    w = {k: v.float() for k, v in w.items()}
    if "lora_up.weight" in w:
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        if "lora_mid.weight" in w:
            mid = w["lora_mid.weight"]
            up2, down2 = up.reshape(up.size(0), -1), down.reshape(down.size(0), -1)
            updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, up2, down2)
        else:
            shape = [up.size(0), down.size(1)] + (list(down.shape[2:]) if down.dim() == 4 else [])
            updown = (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)
    elif "hada_w1_a" in w:
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        dim = w1b.shape[0]
        shape = [w1a.size(0), w1b.size(1)]
        updown = (w1a @ w1b.reshape(w1b.size(0), -1)).reshape(shape) * (w2a @ w2b.reshape(w2b.size(0), -1)).reshape(shape)
    elif "diff" in w:
        dim = None
        updown = w["diff"]
    else:
        raise ValueError(sorted(w))
    if updown.numel() == torch.Size(weight_shape).numel():
        updown = updown.reshape(weight_shape)
    return updown * _scale(w, dim) * multiplier


def module_tensors(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one module (A1111 splits a key at its first dot)."""
    return {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == prefix}
