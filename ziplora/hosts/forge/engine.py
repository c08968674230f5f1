"""Finding Forge 2 and its loaded model, and what a job refuses there (each in one ``HostError`` line)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from ziplora.errors import HostError, ZipLoraError

__all__ = [
    "forge_version", "unsupported", "memory_management", "current_model", "load_model", "check_engine",
    "encoder", "lora_extension", "compute_dtype",
]  # fmt: skip

_SUPPORTED = "Forge 2 (lllyasviel/stable-diffusion-webui-forge, branch main)"
_PREDICTIONS = ("epsilon", "v_prediction")
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PRECISION_FLAGS = {"fp32": "--all-in-fp32", "fp16": "--all-in-fp16", "bf16": "--unet-in-bf16"}


def forge_version() -> str:
    """``modules_forge.forge_version.version`` ("2.0.1v1.10.1" on main), or "unknown"."""
    try:
        return str(importlib.import_module("modules_forge.forge_version").version)
    except Exception:  # noqa: BLE001 - only used in messages
        return "unknown"


def unsupported(what: str) -> HostError:
    return HostError(
        f"{what} (Forge version {forge_version()}): ZipLoRA supports {_SUPPORTED}; "
        "old Forge (ldm_patched) and forks (reForge, Forge Classic/Neo) are not supported"
    )


def memory_management() -> Any:
    """``backend.memory_management``, after checking the Forge 2 pieces the job relies on are there."""
    try:
        mm = importlib.import_module("backend.memory_management")
        importlib.import_module("backend.patcher.lora")
    except ImportError as err:
        raise unsupported(f"this WebUI has no {getattr(err, 'name', None) or 'backend.patcher.lora'}") from None
    for name in ("load_models_gpu", "current_loaded_models"):
        if not hasattr(mm, name):
            raise unsupported(f"backend.memory_management has no {name}")
    return mm


def current_model() -> Any:
    """The WebUI's model object without loading one (None, or Forge's lazy ``FakeInitialModel``)."""
    sd_models = sys.modules.get("modules.sd_models")
    data = getattr(sd_models, "model_data", None)
    return getattr(data, "sd_model", None)


def load_model() -> Any:
    """``forge_model_reload()``: loads the checkpoint if Forge has not yet (it is lazy until the first
    generation) or if the user picked another one since."""
    from modules import sd_models

    reload = getattr(sd_models, "forge_model_reload", None)
    if reload is None:
        raise unsupported("modules.sd_models has no forge_model_reload")
    try:
        loaded = reload()
    except ZipLoraError:
        raise
    except Exception as err:  # noqa: BLE001 - Forge's own failure, reported in one line
        raise HostError(f"Forge could not load the checkpoint: {type(err).__name__}: {' '.join(str(err).split())}") from err
    return loaded[0] if isinstance(loaded, tuple) else loaded


def _engine_kind(sd_model: Any) -> str:
    for flag, kind in (("is_sd1", "SD 1.x"), ("is_sd2", "SD 2.x"), ("is_sd3", "SD3")):
        if getattr(sd_model, flag, False):
            return kind
    name = type(sd_model).__name__
    return {"FakeInitialModel": "not loaded"}.get(name, name)


def check_engine(sd_model: Any) -> None:
    """SDXL base with both text encoders, on Forge 2's engine objects; one HostError line otherwise."""
    if sd_model is None or type(sd_model).__name__ == "FakeInitialModel":
        raise HostError("Forge has no checkpoint loaded; pick an SDXL checkpoint at the top of the page")
    if getattr(sd_model, "forge_objects_original", None) is None:
        raise unsupported("the loaded model has no forge_objects_original")
    clip = getattr(sd_model.forge_objects_original, "clip", None)
    encoders = getattr(clip, "cond_stage_model", None)
    has = {name: encoder(encoders, name) is not None for name in ("clip_l", "clip_g")}
    if type(sd_model).__name__ == "StableDiffusionXLRefiner" or (getattr(sd_model, "is_sdxl", False) and not has["clip_l"]):
        raise HostError("the loaded checkpoint is the SDXL refiner; ZipLoRA merges LoRAs made for SDXL base models: load one")
    if not getattr(sd_model, "is_sdxl", False) or not all(has.values()):
        raise HostError(f"the loaded checkpoint is {_engine_kind(sd_model)}, not SDXL; load an SDXL checkpoint to merge SDXL LoRAs")
    unet = getattr(sd_model.forge_objects_original, "unet", None)
    if getattr(getattr(unet, "model", None), "diffusion_model", None) is None:
        raise unsupported("the UNet patcher has no model.diffusion_model")
    prediction = getattr(getattr(unet.model, "predictor", None), "prediction_type", None)
    if prediction not in _PREDICTIONS:
        raise HostError(f"this checkpoint predicts {prediction!r}; ZipLoRA handles epsilon and v-prediction SDXL models")


def encoder(container: Any, name: str) -> Any:
    """A text encoder of Forge's ``JointTextEncoder`` (an ``nn.Module`` holding them as attributes)."""
    return None if container is None else getattr(container, name, None)


def lora_extension() -> Any:
    """Forge's built-in LoRA module (``extensions-builtin/sd_forge_lora/networks.py``), or None if not loaded."""
    module = sys.modules.get("networks")
    if module is None:
        try:
            module = importlib.import_module("networks")
        except ImportError:
            return None
    return module if hasattr(module, "list_available_networks") else None


def compute_dtype(kmodel: Any, precision: str) -> torch.dtype:
    """The UNet's computation dtype, when the request's precision is "auto" or that dtype; otherwise a refusal."""
    dtype = kmodel.computation_dtype
    wanted = _PRECISIONS.get(precision)
    if wanted is not None and wanted != dtype:
        name = str(dtype).replace("torch.", "")
        raise HostError(
            f"Forge computes this UNet in {name}, so precision {precision} is not available here; start Forge with "
            f"{_PRECISION_FLAGS[precision]} for it, or merge with precision auto"
        )
    return dtype  # type: ignore[no-any-return]
