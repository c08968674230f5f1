"""Making Forge's UNet usable for autograd for one job, and undoing it: inference tensors, ``requires_grad``
flags, the in-place residuals of its transformer blocks, and the weight casts of manual-cast layers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from ziplora.hosts.forge.quantised import expose_shapes, forget_shape, probe_backward, quantised_kind, quantised_param

log = logging.getLogger(__name__)

__all__ = ["usable_for_autograd", "deinference", "transformer_blocks", "clone_first_input", "recompute_casts", "restore_forwards",
           "restore_flags"]  # fmt: skip


@contextmanager
def usable_for_autograd(dm: nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autograd through Forge's UNet ``dm`` for the job, every change undone on exit: ordinary tensors, frozen
    (flags back afterwards), norm inputs copied, low-bit layers' shapes lent, manual casts recomputed; a
    low-bit layer class without a working backward is refused before anything is sampled."""
    with ExitStack() as stack:
        flags = {name: p.requires_grad for name, p in dm.named_parameters()}
        stack.callback(restore_flags, dm, flags)
        replaced = deinference(dm)
        log.info("ZipLoRA: %d inference tensors of Forge's UNet replaced by ordinary copies", replaced)
        dm.requires_grad_(False)
        for block in transformer_blocks(dm):
            for norm in (block.norm1, block.norm2):
                stack.callback(norm.register_forward_pre_hook(clone_first_input).remove)
        for module in expose_shapes(dm):
            stack.callback(forget_shape, module)
        recast = recompute_casts(dm)
        stack.callback(restore_forwards, recast)
        if recast:
            log.info("ZipLoRA: %d layers cast their weights at each forward; the casts are recomputed for backward", len(recast))
        probe_backward(dm, device, dtype)
        yield


@torch.no_grad()
def deinference(root: nn.Module) -> int:
    """Replace every inference-tensor parameter / buffer by an ordinary clone: same module, name, value,
    device and dtype. Forge builds its models under inference mode, and autograd refuses to save such
    tensors. Quantised (NF4 / GGUF) weights stay: their layers dequantise into fresh tensors anyway.
    Returns how many tensors were replaced; the old ones are freed unless something else holds them."""
    replaced: dict[int, nn.Parameter] = {}
    count = 0
    with torch.inference_mode(False):
        for module in root.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.is_inference() or quantised_param(p):
                    continue
                new = replaced.get(id(p))
                if new is None:
                    copy = getattr(p, "copy_with_data", None)  # GGUF's unquantised tensors keep their class
                    new = copy(p.data.clone()) if callable(copy) else nn.Parameter(p.data.clone(), requires_grad=False)
                    new.requires_grad_(False)
                    for attr, value in getattr(p, "__dict__", {}).items():
                        if attr not in getattr(new, "__dict__", {}):
                            setattr(new, attr, value)
                    replaced[id(p)] = new
                    count += 1
                module._parameters[name] = new
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_inference():
                    module._buffers[name] = b.clone()
                    count += 1
    return count


def transformer_blocks(root: nn.Module) -> list[nn.Module]:
    """Forge's BasicTransformerBlocks (``backend/nn/unet.py``), by what they hold rather than their class."""
    return [
        m for m in root.modules()
        if all(isinstance(getattr(m, a, None), nn.Module) for a in ("norm1", "norm2", "attn1", "attn2"))
    ]  # fmt: skip


def clone_first_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A forward pre-hook for ``norm1`` / ``norm2``: BasicTransformerBlock._forward does ``x += n`` after attn1
    and attn2, overwriting the tensor norm1 / norm2 saved for backward; a copy keeps the saved one intact.
    Only while gradients are recorded."""
    if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(), *args[1:])
    return None


def recompute_casts(root: nn.Module) -> list[nn.Module]:
    """Layers that cast their stored weight to the input's dtype at every forward (``parameters_manual_cast``:
    fp8 storage, ``--unet-in-fp16`` computing in fp32 on a CPU, a partial load) hand ``F.linear`` / the conv a
    fresh copy, which autograd keeps until backward: the whole UNet again in the computation dtype (~10 GiB
    for SDXL in fp32; seen on a real Forge). While the job runs, such a layer's forward is recomputed in
    backward instead (``torch.utils.checkpoint``): only its input is kept. Quantised layers are left alone
    (their dequantised copies are the same story, but their backward is probed separately)."""
    from torch.utils.checkpoint import checkpoint

    changed: list[nn.Module] = []
    for module in root.modules():
        if not getattr(module, "parameters_manual_cast", False) or quantised_kind(module) is not None:
            continue
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or "forward" in module.__dict__:
            continue
        original = module.forward

        def forward(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        module.forward = forward  # an instance attribute: the class's forward comes back when it is deleted
        changed.append(module)
    return changed


def restore_forwards(modules: list[nn.Module]) -> None:
    for module in modules:
        module.__dict__.pop("forward", None)


def restore_flags(root: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in root.named_parameters():
        if name in flags and p.requires_grad != flags[name]:
            p.requires_grad_(flags[name])
