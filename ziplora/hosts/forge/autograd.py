"""Making Forge's UNet usable for autograd for one job, and undoing it: inference tensors, ``requires_grad``
flags, the in-place residuals of its transformer blocks, and the weight casts of manual-cast layers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ziplora.hosts.forge.quantised import expose_shapes, forget_shape, probe_backward, quantised_kind, quantised_param

log = logging.getLogger(__name__)

__all__ = ["usable_for_autograd", "ordinary_tensors", "transformer_blocks", "clone_first_input", "recompute_casts", "restore_forwards",
           "restore_flags"]  # fmt: skip


@contextmanager
def usable_for_autograd(dm: nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autograd through Forge's UNet ``dm`` for the job, every change undone on exit: ordinary tensors (the
    originals put back), frozen (flags back afterwards), norm inputs copied, low-bit layers' shapes lent, manual
    casts recomputed; a low-bit layer class without a working backward is refused before anything is sampled."""
    with ExitStack() as stack:
        flags = {name: p.requires_grad for name, p in dm.named_parameters()}
        stack.callback(restore_flags, dm, flags)
        swapped = stack.enter_context(ordinary_tensors(dm))
        log.info("ZipLoRA: %d inference tensors of Forge's UNet swapped for ordinary copies for the job", swapped)
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


@contextmanager
def ordinary_tensors(root: nn.Module) -> Iterator[int]:
    """For the job, every inference-tensor parameter / buffer of ``root`` is swapped for an ordinary copy (same
    module, name, value, device, dtype and class; autograd refuses to save inference tensors, and Forge builds
    its models under inference mode). Quantised (NF4 / GGUF) weights stay: their layers dequantise into fresh
    tensors anyway. Yields how many tensors were swapped.

    Afterwards the module holds the very same tensor objects again, inference tensors again, with their flags
    and attributes. While the job runs they hold no memory: each one's storage is released as soon as its copy
    exists and refilled from the copy at the end (with the copy's latest value, device and dtype, should Forge
    have moved or cast it), one tensor at a time, so peak memory grows by one tensor, not by the UNet."""
    swaps: list[_Swap] = []
    try:
        _swap_for_copies(root, swaps)
        yield len({id(s.original) for s in swaps})
    finally:
        _put_back(swaps)


@dataclass
class _Swap:
    table: dict[str, Any]  # the module's _parameters or _buffers
    name: str
    original: torch.Tensor  # Forge's inference tensor (its storage released while the job runs)
    copy: torch.Tensor


@torch.no_grad()
def _swap_for_copies(root: nn.Module, swaps: list[_Swap]) -> None:
    copies: dict[int, torch.Tensor] = {}  # id(original) -> its copy: a tensor shared by two modules stays shared
    for module in root.modules():
        tables: tuple[tuple[dict[str, Any], bool], ...] = ((module._parameters, True), (module._buffers, False))
        for table, parameters in tables:
            for name, t in list(table.items()):
                if t is None or not t.is_inference() or (parameters and quantised_param(t)):
                    continue
                copy = copies.get(id(t))
                if copy is None:
                    copy = copies[id(t)] = _ordinary_copy(t, parameters)
                    with torch.inference_mode():
                        t.data = torch.empty(0, dtype=t.dtype, device=t.device)  # the original holds no memory now
                table[name] = copy
                swaps.append(_Swap(table, name, t, copy))


def _ordinary_copy(t: torch.Tensor, parameter: bool) -> torch.Tensor:
    with torch.inference_mode(False):
        if not parameter:
            return t.clone()
        copy = getattr(t, "copy_with_data", None)  # GGUF's unquantised tensors keep their class
        new = copy(t.data.clone()) if callable(copy) else nn.Parameter(t.data.clone(), requires_grad=False)
        new.requires_grad_(False)
        for attr, value in getattr(t, "__dict__", {}).items():
            if attr not in getattr(new, "__dict__", {}):
                setattr(new, attr, value)
        return new  # type: ignore[no-any-return]


@torch.no_grad()
def _put_back(swaps: list[_Swap]) -> None:
    """Each original refilled (as an inference tensor) from what its module holds now, and put back in place;
    the copies are dropped as it goes."""
    refilled: set[int] = set()
    while swaps:
        swap = swaps.pop()
        if id(swap.original) not in refilled:
            current = swap.table.get(swap.name)
            source = current if isinstance(current, torch.Tensor) else swap.copy
            with torch.inference_mode():
                swap.original.data = source.detach().clone()
            refilled.add(id(swap.original))
        swap.table[swap.name] = swap.original


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
