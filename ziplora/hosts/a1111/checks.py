"""What a job refuses on A1111, each in one ``HostError`` line, before anything is changed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ziplora.errors import HostError

__all__ = ["check_model", "text_encoders", "session_dtype"]

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def text_encoders(sd_model: Any) -> tuple[nn.Module, nn.Module]:
    """(CLIP-L as HF ``CLIPTextModel``, OpenCLIP bigG's text model) of an SDXL-base conditioner."""
    wrapped = [e.wrapped for e in sd_model.conditioner.embedders if hasattr(e, "wrapped")]
    te1 = next((getattr(w, "transformer", None) for w in wrapped if hasattr(getattr(w, "transformer", None), "text_model")), None)
    te2 = next((w.model for w in wrapped if hasattr(getattr(getattr(w, "model", None), "transformer", None), "resblocks")), None)
    if len(wrapped) != 2 or te1 is None or te2 is None:
        raise HostError(
            f"the loaded checkpoint has {len(wrapped)} text encoder(s), not SDXL base's CLIP-L + OpenCLIP bigG "
            "(an SDXL refiner?); load an SDXL base checkpoint"
        )
    return te1, te2


def check_model(sd_model: Any) -> None:
    """Refuse, with one line each, what the job cannot run on (before anything is changed)."""
    from modules import devices, sd_unet, shared

    if not getattr(sd_model, "is_sdxl", False):
        kind = "SD3" if getattr(sd_model, "is_sd3", False) else "SD2" if getattr(sd_model, "is_sd2", False) else "SD1"
        raise HostError(f"the loaded checkpoint is {kind}; ZipLoRA merges SDXL LoRAs: load an SDXL checkpoint first")
    if getattr(sd_model, "is_ssd", False):
        raise HostError(
            "the loaded checkpoint is SSD-1B, a pruned SDXL whose blocks SDXL LoRAs do not all match; load an SDXL base checkpoint"
        )
    if getattr(sd_model, "is_sdxl_inpaint", False):
        raise HostError("the loaded checkpoint is an SDXL inpainting model; load an SDXL base checkpoint for merging")
    if getattr(shared.cmd_opts, "lowvram", False):
        raise HostError(
            "--lowvram moves UNet blocks between CPU and GPU inside each forward pass, which breaks training; restart without --lowvram (--medvram works, slower)"
        )
    if getattr(sd_unet, "current_unet", None) is not None:
        label = getattr(getattr(sd_unet.current_unet, "option", None), "label", type(sd_unet.current_unet).__name__)
        raise HostError(
            f"an alternative UNet ({label}) is active and would bypass the merge; set Settings > SD Unet to None or Automatic without it"
        )
    if getattr(devices, "fp8", False) or any(str(p.dtype).startswith("torch.float8") for p in sd_model.model.diffusion_model.parameters()):
        raise HostError(
            "the UNet is stored in fp8 (Settings > FP8 weight), which cannot be trained through; turn FP8 weight off for the merge"
        )
    text_encoders(sd_model)


def session_dtype(precision: str) -> torch.dtype:
    """The UNet's dtype, when the request's precision is "auto" or that dtype; otherwise a refusal."""
    from modules import devices

    dtype = devices.dtype_unet
    if precision == "auto" or _PRECISIONS.get(precision) == dtype:
        return dtype
    asked = _DTYPE_NAMES.get(_PRECISIONS.get(precision, dtype), precision)
    have = _DTYPE_NAMES.get(dtype, str(dtype))
    hint = "start the WebUI with --no-half" if precision == "fp32" else "choose precision auto"
    raise HostError(f"{asked} was asked for (or needed after an overflow) but this WebUI runs the UNet in {have}; {hint}")
