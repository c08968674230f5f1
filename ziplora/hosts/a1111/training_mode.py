"""A1111's model made trainable for a job, and put back: frozen parameters, sgm's own checkpoint flags off, and
a cross-attention optimisation that has a backward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["frozen", "attention_for_backward"]

_SDP_TITLE = "sdp - scaled dot product"  # modules/sd_hijack_optimizations.py SdOptimizationSdp.title()
_BACKWARD_SAFE_OPTIMIZERS = ("sdp", "sdp-no-mem", "xformers")  # memory-efficient kernels with a backward pass


@contextmanager
def frozen(sd_model: nn.Module) -> Iterator[None]:
    """No parameter of the model trains (A1111 leaves the UNet's requires_grad at True); sgm's own gradient
    checkpointing is off (its CheckpointFunction would drop the mergers' gradients). All restored after."""
    flags = [(p, p.requires_grad) for p in sd_model.parameters()]
    checkpoint_flags = [
        (m, attr, getattr(m, attr))
        for m in sd_model.model.diffusion_model.modules()
        for attr in ("checkpoint", "use_checkpoint")
        if getattr(m, attr, None) is True
    ]
    try:
        sd_model.requires_grad_(False)
        for m, attr, _ in checkpoint_flags:
            setattr(m, attr, False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, attr, value in checkpoint_flags:
            setattr(m, attr, value)


@contextmanager
def attention_for_backward() -> Iterator[None]:
    """SDP cross-attention for the job (Doggettx / V1 / InvokeAI keep every attention map for backward), then
    the user's choice again."""
    from modules import sd_hijack

    previous = getattr(sd_hijack, "current_optimizer", None)
    name = getattr(previous, "name", None)
    if name in _BACKWARD_SAFE_OPTIMIZERS:
        yield
        return
    sd_hijack.model_hijack.apply_optimizations(_SDP_TITLE)
    try:
        yield
    finally:
        sd_hijack.model_hijack.apply_optimizations(previous.title() if previous is not None else "None")
