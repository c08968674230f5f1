"""One job's view of Forge's loaded SDXL model: its networks as torch modules, prompt encoding, prediction, the
noise schedule and the VAE (``ziplora.hosts.base.ModelSession``)."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ziplora.errors import HostError
from ziplora.formats.keys import LayerKey
from ziplora.hosts.base import iter_blocks, resolve_in_roots
from ziplora.hosts.forge.engine import encoder
from ziplora.hosts.forge.memory import refuse_cpu_swap
from ziplora.hosts.forge.quantised import quantised_kind
from ziplora.merge.patch import can_fuse
from ziplora.schedule import Cond, NoiseSchedule

log = logging.getLogger(__name__)

__all__ = ["ForgeSession"]


class ForgeSession:
    """One job's view of Forge's loaded SDXL model (see ``ziplora.hosts.base.ModelSession``)."""

    text_encoder_grad = False  # Forge encodes prompts under inference mode: text-encoder mergers cannot learn

    def __init__(self, sd_model: Any, unet_patcher: Any, mm: Any, dtype: torch.dtype, memory: int,
                 resolution: int, guidance: float) -> None:  # fmt: skip
        kmodel = unet_patcher.model
        encoders = sd_model.forge_objects_original.clip.cond_stage_model
        self._sd_model = sd_model
        self._unet_patcher = unet_patcher
        self._mm = mm
        self._memory = memory
        self.unet: nn.Module = kmodel.diffusion_model
        self.device = torch.device(unet_patcher.load_device)
        self.dtype = dtype
        predictor = kmodel.predictor
        with torch.inference_mode(False):
            alphas = predictor.alphas_cumprod.detach().float().cpu().clone()
        self.schedule = NoiseSchedule(alphas, str(predictor.prediction_type))
        self.roots: dict[str, nn.Module] = {
            "unet": self.unet,
            "te1": encoder(encoders, "clip_l").transformer,
            "te2": encoder(encoders, "clip_g").transformer,
        }
        self.default_resolution = resolution
        self.default_guidance = guidance

    # -- layers -----------------------------------------------------------------------------------------
    def resolve(self, key: LayerKey) -> tuple[nn.Module, str]:
        root = self.roots.get(key.component)
        if root is not None and key.component != "unet":
            device = next((p.device for p in root.parameters()), self.device)
            if device != self.device:
                raise HostError(
                    f"Forge keeps the text encoders on {device} and the UNet on {self.device} (low-VRAM mode); "
                    "merging text-encoder layers needs both on one device: untick 'merge text encoders'"
                )
        return resolve_in_roots(self.roots, key)

    def fusable(self, module: nn.Module) -> bool:
        """Fused form only on a plain weight on the job's device: not fp8 / NF4 / GGUF storage, not an fp8
        ``scale_weight`` layer, not a CPU-swapped one, never with a Forge online LoRA attached."""
        return (
            can_fuse(module, self.device)
            and quantised_kind(module) is None
            and getattr(module, "scale_weight", None) is None
            and not getattr(module, "forge_online_loras", None)
        )

    def checkpoint_blocks(self) -> list[nn.Module]:
        # Forge's own checkpoint() raises NotImplementedError when enabled; the core wraps these blocks itself
        return list(iter_blocks(self.unet))

    # -- conditioning -----------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Cond:
        return self._conditioning(list(prompts), negative=False)

    def encode_negative(self, n: int) -> Cond:
        return self._conditioning([""] * n, negative=True)

    def _conditioning(self, prompts: list[str], negative: bool) -> Cond:
        from modules.prompt_parser import SdConditioning

        size = self.default_resolution
        cond = self._sd_model.get_learned_conditioning(SdConditioning(prompts, is_negative_prompt=negative, width=size, height=size))
        return {k: own(v).to(self.device) for k, v in cond.items()}

    # -- denoising --------------------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """eps (or v) at DDPM timesteps ``t``: the UNet called as ``KModel.apply_model`` calls it, inputs cast to
        Forge's computation dtype, without the k-diffusion scaling around it."""
        self._ensure_unet_loaded()
        d, dt = self.device, self.dtype
        return self.unet(
            x_t.to(d, dt), t.to(d).float(), context=cond["crossattn"].to(d, dt), y=cond["vector"].to(d, dt), transformer_options={}
        )

    def _ensure_unet_loaded(self) -> None:
        # Forge may unload the UNet to make room when it loads the text encoders or the VAE for us; load it
        # back the Forge way (a LoRA refresh is a no-op: the weights are already LoRA-free)
        if any(entry.model is self._unet_patcher for entry in self._mm.current_loaded_models):
            return
        log.info("ZipLoRA: Forge unloaded the UNet during the job; loading it again")
        self._mm.load_models_gpu([self._unet_patcher], memory_required=self._memory)
        refuse_cpu_swap(self._mm, self._unet_patcher)

    # -- latents ----------------------------------------------------------------------------------------
    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        vae = self._sd_model.forge_objects.vae
        ratio = int(getattr(vae, "downscale_ratio", 8))
        return (int(getattr(vae, "latent_channels", 4)), height // ratio, width // ratio)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self._sd_model.decode_first_stage(latents)
        with torch.inference_mode(False):
            return ((images.detach().float().clone() + 1) / 2).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1], centre-cropped square and resized to the session's resolution (the content
        and style samples share one batch, so every reference image gets the same size)."""
        size = self.default_resolution
        h, w = images.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[..., top : top + side, left : left + side]
        if side != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        latents = self._sd_model.encode_first_stage((images * 2 - 1).to(self.device))
        return own(latents)


def own(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor from one Forge made under inference mode."""
    with torch.inference_mode(False):
        return t.detach().clone()
