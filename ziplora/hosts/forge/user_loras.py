"""The user's LoRAs on Forge: off the model for a job (the LoRA-free patchers, loaded the Forge way), back at the
user's next generation (Forge re-applies them itself)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ziplora.errors import HostError
from ziplora.hosts.forge.memory import refuse_cpu_swap

__all__ = ["lora_free_objects"]


@contextmanager
def lora_free_objects(sd_model: Any, mm: Any, memory: int) -> Iterator[None]:
    """The LoRA-free model for the job, checked; ``sd_model.forge_objects`` put back as it was afterwards.

    1. Forge's current objects (perhaps the user's LoRA clones) -> the LoRA-free originals for the job, so
       Forge's own calls (prompt encoding, VAE) use them too.
    2. The LoRA-free patchers loaded the Forge way: ``LoraLoader.refresh`` restores the original weights (and
       drops on-the-fly LoRAs); Forge's registry stays right for the next generation, which loads the user's
       LoRA clones again and re-applies their LoRAs.
    """
    original = sd_model.forge_objects_original
    unet, clip = original.unet, original.clip
    current = sd_model.forge_objects
    sd_model.forge_objects = original.shallow_copy()
    try:
        mm.load_models_gpu([unet, clip.patcher], memory_required=memory)
        refuse_cpu_swap(mm, unet)
        _check_lora_free([unet, clip.patcher], [unet.model.diffusion_model, clip.cond_stage_model])
        yield
    finally:
        sd_model.forge_objects = current


def _check_lora_free(patchers: list[Any], roots: list[nn.Module]) -> None:
    for patcher in patchers:
        loader = getattr(patcher, "lora_loader", None)
        if loader is not None and (getattr(loader, "loaded_hash", str([])) != str([]) or getattr(loader, "backup", None)):
            raise HostError("Forge did not take the user's LoRAs off the model; generate once without LoRAs, then merge again")
    for root in roots:
        if any(getattr(m, "forge_online_loras", None) for m in root.modules()):
            raise HostError("an on-the-fly LoRA is still attached to the model; generate once without LoRAs, then merge again")
