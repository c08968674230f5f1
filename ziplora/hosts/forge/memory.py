"""Forge's memory management as a job meets it: what to ask it to keep free, and the partial (CPU-swapped) load a
job refuses."""

from __future__ import annotations

from typing import Any

from ziplora.errors import HostError

__all__ = ["loaded_entry", "refuse_cpu_swap", "training_memory"]


def loaded_entry(mm: Any, patcher: Any) -> Any:
    """The ``LoadedModel`` of ``patcher`` in Forge's registry, or None (entries compare by patcher identity)."""
    return next((entry for entry in mm.current_loaded_models if entry.model is patcher), None)


def refuse_cpu_swap(mm: Any, unet_patcher: Any) -> None:
    entry = loaded_entry(mm, unet_patcher)
    if entry is not None and getattr(entry, "model_accelerated", False):
        raise HostError(
            "Forge could fit only part of the UNet on the GPU and swaps the rest from CPU memory; training through "
            "swapped layers keeps a GPU copy of each alive until backward and runs out of memory: raise 'GPU Weights', "
            "close other GPU programs or drop --always-low-vram / --always-no-vram, then merge again"
        )


def training_memory(unet_patcher: Any, resolution: int, latent: tuple[int, int], checkpointing: bool) -> int:
    """What to ask Forge to keep free: its own inference estimate for a batch of two, times what backward adds
    (activations kept until backward; far fewer with checkpointing). It only makes Forge unload other models."""
    channels, ratio = latent
    shape = [2, channels, resolution // ratio, resolution // ratio]
    try:
        inference = float(unet_patcher.memory_required(shape))
    except Exception:  # noqa: BLE001 - an estimate; Forge without it still works
        return 0
    return int(inference * (2 if checkpointing else 8))
