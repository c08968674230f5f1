"""Forge's low-bit layers (NF4/FP4 through bitsandbytes, GGUF): recognised by their weight, lent their shape for
a job (they carry no ``in_features`` / ``out_features``), and probed once for a working backward pass."""

from __future__ import annotations

import torch
from torch import nn

from ziplora.errors import HostError

__all__ = ["quantised_kind", "quantised_param", "logical_shape", "expose_shapes", "forget_shape", "probe_backward"]


def quantised_kind(module: nn.Module) -> str | None:
    """'NF4/FP4 (bitsandbytes)' or 'GGUF' for Forge's low-bit Linears (by their weight), else None."""
    weight = getattr(module, "weight", None)
    if getattr(weight, "quant_state", None) is not None or getattr(weight, "bnb_quantized", False):
        return "NF4/FP4 (bitsandbytes)"
    if getattr(weight, "gguf_cls", None) is not None:
        return "GGUF"
    return None


def quantised_param(p: torch.Tensor) -> bool:
    return getattr(p, "quant_state", None) is not None or getattr(p, "bnb_quantized", False) or getattr(p, "gguf_cls", None) is not None


def logical_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a low-bit Linear: bitsandbytes keeps it in ``quant_state.shape``, GGUF in ``weight.shape``."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    shape = getattr(state, "shape", None) if state is not None else getattr(weight, "shape", None)
    if shape is None or len(shape) != 2:
        return None
    return int(shape[0]), int(shape[1])


def expose_shapes(root: nn.Module) -> list[nn.Module]:
    """Give Forge's low-bit Linears (which know no in/out_features) their shape for the job; returns those
    changed, so the attributes can be removed afterwards (``forget_shape``)."""
    changed = []
    for module in root.modules():
        if quantised_kind(module) is None or hasattr(module, "in_features"):
            continue
        shape = logical_shape(module)
        if shape is None:
            continue
        module.out_features, module.in_features = shape
        changed.append(module)
    return changed


def forget_shape(module: nn.Module) -> None:
    for attr in ("in_features", "out_features"):
        module.__dict__.pop(attr, None)


def probe_backward(root: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Say up front, not after minutes of sampling, when gradients cannot flow through a low-bit layer class."""
    seen: set[type] = set()
    for module in root.modules():
        kind = quantised_kind(module)
        if kind is None or type(module) in seen:
            continue
        seen.add(type(module))
        shape = logical_shape(module)
        if shape is None:
            continue
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = torch.randn(2, shape[1], device=device, dtype=dtype, requires_grad=True)
                module(x).float().square().mean().backward()
            ok = x.grad is not None and bool(torch.isfinite(x.grad).all())
            why = "no gradient came back"
        except Exception as err:  # noqa: BLE001 - reported as the reason
            ok, why = False, f"{type(err).__name__}: {' '.join(str(err).split())}"[:200]
        if not ok:
            raise HostError(
                f"gradients cannot flow through this checkpoint's {kind} layers here ({why}); "
                "load an fp16, bf16 or fp8 version of the checkpoint to merge"
            )
