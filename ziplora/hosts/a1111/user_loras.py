"""The user's LoRAs and hypernetworks on A1111: taken off the model for a job and put back afterwards, and a
rewritten file's old tensors unbaked. A1111's built-in Lora extension is the ``networks`` module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["lora_extension", "extra_networks_off", "unbake"]


def lora_extension() -> Any | None:
    """The built-in Lora extension's ``networks`` module, or None when that extension is disabled."""
    try:
        import networks  # type: ignore[import-not-found]
    except ImportError:
        return None
    return networks


@contextmanager
def extra_networks_off(sd_model: nn.Module) -> Iterator[None]:
    """The bare checkpoint for the job: no hypernetwork in the attention, every module at its original weight
    and the Lora extension idle; both selections back afterwards.

    ``networks.load_networks([])`` alone is not enough: baked weights are restored only inside each module's
    next patched forward, and our fused layers read ``weight`` without calling it. So every module holding a
    baked set (``network_current_names``) is restored from its backup here, and marked unbaked; A1111 then
    re-applies whatever ``loaded_networks`` holds after the job on each module's next forward. Hypernetworks
    (``shared.loaded_hypernetworks``, applied inside every cross-attention) also stay selected after a
    generation that used them; they are set aside the same way.
    """
    from modules import shared

    hypernetworks = getattr(shared, "loaded_hypernetworks", None)
    hypernetworks = hypernetworks if isinstance(hypernetworks, list) else []
    networks = lora_extension()
    loaded = networks.loaded_networks if networks is not None else []
    saved_hypernetworks, saved_loaded = list(hypernetworks), list(loaded)
    try:
        hypernetworks.clear()
        loaded.clear()
        if networks is not None:
            with torch.no_grad():  # A1111 restores inside forwards, under no_grad; the UNet's weights require grad
                for module in sd_model.modules():
                    if getattr(module, "network_current_names", ()) != ():
                        networks.network_restore_weights_from_backup(module)
                        module.network_current_names = ()
        yield
    finally:
        loaded[:] = saved_loaded
        hypernetworks[:] = saved_hypernetworks


def _loaded_model() -> nn.Module | None:
    """The loaded checkpoint, or None; never loads one (``shared.sd_model`` would)."""
    try:
        from modules import sd_models
    except ImportError:
        return None
    return getattr(getattr(sd_models, "model_data", None), "sd_model", None)


def unbake(networks: Any, name: str) -> int:
    """Undo the bake of LoRA ``name`` wherever A1111's default (non-functional) path holds it in the weights.

    A rewritten file keeps its name, so A1111's marker of what a module holds (``network_current_names``:
    name and multipliers, no file time) still matches on the next generation with ``<lora:NAME:...>``, and
    ``network_apply_weights`` keeps the OLD tensors baked in although ``load_networks`` re-read the file.
    Putting those modules back to their backups (and marking them unbaked) makes the next forward apply the
    new file; a generation without the LoRA then finds clean weights. Returns how many modules were reset."""
    model = _loaded_model()
    if model is None:
        return 0
    count = 0
    with torch.no_grad():  # restore_weights_backup copies in place; the UNet's weights require grad
        for module in model.modules():
            current = getattr(module, "network_current_names", ())
            if any(isinstance(entry, tuple) and entry and entry[0] == name for entry in current):
                networks.network_restore_weights_from_backup(module)
                module.network_current_names = ()
                count += 1
    return count
