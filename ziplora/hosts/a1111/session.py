"""One job's view of A1111's loaded SDXL checkpoint: its networks as torch modules, prompt encoding, prediction,
the noise schedule and the VAE (``ziplora.hosts.base.ModelSession``)."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ziplora.errors import HostError, JobFailed
from ziplora.formats.keys import LayerKey
from ziplora.hosts.a1111.checks import text_encoders
from ziplora.hosts.a1111.open_clip_attention import MultiheadAttentionAsLinears
from ziplora.hosts.base import iter_blocks, resolve_in_roots
from ziplora.schedule import Cond, NoiseSchedule

__all__ = ["A1111Session", "strip_extra_networks"]

_RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # modules/extra_networks.py re_extra_net
_RE_TE2 = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def strip_extra_networks(prompt: str) -> str:
    """Remove ``<lora:...>``-style tags: the conditioner would read them as words (A1111 strips them in
    processing, before ``get_learned_conditioning``)."""
    return " ".join(_RE_EXTRA_NETWORK.sub("", prompt).split())


class A1111Session:
    """One job's view of the loaded SDXL checkpoint (an sgm ``DiffusionEngine`` as A1111 extends it)."""

    default_guidance = 5.0
    text_encoder_grad = False  # sgm's GeneralConditioner runs non-trainable embedders under torch.no_grad

    def __init__(self, sd_model: Any, dtype: torch.dtype, default_resolution: int, default_guidance: float) -> None:
        from modules import devices

        self.sd_model = sd_model
        self.device = torch.device(devices.device)
        self.dtype = dtype
        self.default_resolution = default_resolution
        self.default_guidance = default_guidance
        alphas = getattr(sd_model, "alphas_cumprod_original", None)
        if alphas is None:  # the un-overridden schedule when A1111 kept one (sd_models.apply_alpha_schedule_override)
            alphas = sd_model.alphas_cumprod
        prediction = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        self.schedule = NoiseSchedule(alphas.detach().float().cpu(), prediction)
        te1, te2 = text_encoders(sd_model)
        self.unet: nn.Module = sd_model.model.diffusion_model
        # te2's tree is open_clip's (model.transformer.resblocks.N.attn / mlp.c_fc), not the canonical HF
        # names: resolve() maps those; roots["te2"] is only the tree the layers live in
        self.roots: dict[str, nn.Module] = {"unet": self.unet, "te1": te1, "te2": te2}
        self._adapters: dict[int, tuple[nn.Module, nn.Module, MultiheadAttentionAsLinears]] = {}

    # -- layers ---------------------------------------------------------------------------------------------
    def resolve(self, key: LayerKey) -> tuple[nn.Module, str]:
        if key.component != "te2":
            return resolve_in_roots(self.roots, key)
        m = _RE_TE2.match(key.path)
        blocks = self.roots["te2"].transformer.resblocks
        if m is None or int(m.group(1)) >= len(blocks):
            raise HostError(f"{key} has no counterpart in A1111's OpenCLIP text encoder (only attention and MLP layers do)")
        block = blocks[int(m.group(1))]
        if m.group(4):
            return block.mlp, {"fc1": "c_fc", "fc2": "c_proj"}[m.group(4)]
        return self._adapter(int(m.group(1)), block), m.group(3)

    def _adapter(self, index: int, block: nn.Module) -> MultiheadAttentionAsLinears:
        """The job-lifetime q/k/v/out view of block ``index``'s attention, installed once (every projection,
        out_proj included, goes through it: the fused MHA reads out_proj.weight directly, past any patch)."""
        if index not in self._adapters:
            mha = block.attn
            if not isinstance(mha, nn.MultiheadAttention):
                raise HostError(
                    f"the second text encoder's block {index} attention is a {type(mha).__name__}, not open_clip's MultiheadAttention"
                )
            adapter = MultiheadAttentionAsLinears(mha)
            block.attn = adapter
            self._adapters[index] = (block, mha, adapter)
        return self._adapters[index][2]

    def close(self) -> None:
        """Put open_clip's own attention modules back (after the core has unpatched its layers)."""
        while self._adapters:
            _, (block, mha, _) = self._adapters.popitem()
            block.attn = mha

    # -- the model --------------------------------------------------------------------------------------------
    def _conditioning(self, prompts: list[str], negative: bool) -> Cond:
        from modules import devices, prompt_parser

        size = self.default_resolution
        batch = prompt_parser.SdConditioning(prompts, is_negative_prompt=negative, width=size, height=size)
        with devices.autocast(), torch.no_grad():
            cond = self.sd_model.get_learned_conditioning(batch)
        return {k: v for k, v in cond.items() if isinstance(v, torch.Tensor)}

    def encode(self, prompts: list[str]) -> Cond:
        return self._conditioning([strip_extra_networks(p) for p in prompts], negative=False)

    def encode_negative(self, n: int) -> Cond:
        """An empty negative prompt, as txt2img encodes it (zeroed text embeddings: force_zero_embeddings)."""
        return self._conditioning([""] * n, negative=True)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # A1111's apply_model hijack casts the cond dict's tensors in place: hand it a copy
        return self.sd_model.apply_model(x_t, t, dict(cond))

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        from modules import processing

        channels = getattr(self.sd_model, "latent_channels", processing.opt_C)
        return (channels, height // processing.opt_f, width // processing.opt_f)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from modules import devices, processing

        try:
            with torch.no_grad():
                samples = processing.decode_latent_batch(self.sd_model, latents, target_device=devices.cpu, check_for_nans=True)
        except devices.NansException:
            raise JobFailed("the VAE produced NaNs while decoding; start the WebUI with --no-half-vae") from None
        images = torch.stack([s.float() for s in samples])
        return ((images + 1) / 2).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        from modules import processing, sd_samplers_common

        f = processing.opt_f
        h, w = images.shape[-2:]
        if h % f or w % f:
            images = F.interpolate(images.float(), size=(max(f, h // f * f), max(f, w // f * f)), mode="area")
        with torch.no_grad():
            return sd_samplers_common.images_tensor_to_samples(images, approximation=None, model=self.sd_model)

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(iter_blocks(self.unet))
