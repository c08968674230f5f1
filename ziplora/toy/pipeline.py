"""ToyXL: the tiny SDXL-shaped text-to-image model (UNet + two text encoders + schedule + identity "VAE").

Its networks are ``ziplora.architecture``'s classes at the sizes in ``ziplora.architecture.toyxl``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ziplora.architecture.clip_text import CLIPTextModel
from ziplora.architecture.sgm_unet import UNetModel, timestep_embedding
from ziplora.architecture.toyxl import LATENT_FACTOR, SIZE_EMBED_DIM, TE1_CONFIG, TE2_CONFIG, UNET_CONFIG, VOCAB_SIZE
from ziplora.schedule import Cond, NoiseSchedule, ddim_sample
from ziplora.toy.text import VOCAB, Tokenizer
from ziplora.toy.world import IMAGE_SIZE

__all__ = ["ToyXL", "untrained_toy"]

assert len(VOCAB) <= VOCAB_SIZE


def zero_init_like_sgm(unet: UNetModel) -> None:
    """Zero the layers sgm builds with ``zero_module`` (ResBlock out_layers.3, proj_out, out.2)."""
    for name, module in unet.named_modules():
        if name.endswith("out_layers.3") or name.endswith("proj_out") or name == "out.2":
            nn.init.zeros_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class ToyXL(nn.Module):
    """Holds the three networks. The "VAE" is exact: latents are the [-1, 1] image, space-to-depth by 2."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = UNetModel(UNET_CONFIG)
        self.te1 = CLIPTextModel(TE1_CONFIG)
        self.te2 = CLIPTextModel(TE2_CONFIG)
        self.tokenizer = Tokenizer(TE1_CONFIG.max_length)
        self.schedule = NoiseSchedule.scaled_linear()
        self.image_size = IMAGE_SIZE
        zero_init_like_sgm(self.unet)

    # -- conditioning ---------------------------------------------------------------------------------------
    def size_vector(self, batch: int, device: torch.device) -> torch.Tensor:
        sizes = torch.tensor([IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE], dtype=torch.float32, device=device)
        emb = timestep_embedding(sizes, SIZE_EMBED_DIM).reshape(1, -1)
        return emb.expand(batch, -1)

    def encode(self, prompts: list[str]) -> Cond:
        """SDXL-style conditioning: {"crossattn": te1 ⊕ te2 penultimate states, "vector": pooled te2 ⊕ sizes}."""
        device = next(self.parameters()).device
        tokens, eos = self.tokenizer(prompts)
        tokens, eos = tokens.to(device), eos.to(device)
        h1, _ = self.te1(tokens, eos)
        h2, pooled = self.te2(tokens, eos)
        return {
            "crossattn": torch.cat([h1, h2], dim=-1),
            "vector": torch.cat([pooled, self.size_vector(len(prompts), device).to(pooled.dtype)], dim=-1),
        }

    # -- the "VAE" ------------------------------------------------------------------------------------------
    @staticmethod
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        """[B, 3, 32, 32] in [0, 1] -> latents [B, 12, 16, 16]."""
        return F.pixel_unshuffle(images * 2 - 1, LATENT_FACTOR)

    @staticmethod
    def decode_latents(latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, 32, 32] in [0, 1]."""
        return ((F.pixel_shuffle(latents.float(), LATENT_FACTOR) + 1) / 2).clamp(0, 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (3 * LATENT_FACTOR**2, IMAGE_SIZE // LATENT_FACTOR, IMAGE_SIZE // LATENT_FACTOR)

    # -- denoising ------------------------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.unet(x_t, t, cond["crossattn"], cond["vector"])

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seed: int = 0,
        steps: int = 25,
        guidance: float = 4.0,
    ) -> torch.Tensor:
        """Images [B, 3, 32, 32] in [0, 1]; seed i+k for the k-th prompt."""
        device = next(self.parameters()).device
        noise = torch.stack(
            [torch.randn(*self.latent_shape, generator=torch.Generator().manual_seed(seed + k)) for k in range(len(prompts))]
        ).to(device)
        cond = self.encode(prompts)
        uncond = self.encode([""] * len(prompts))
        x0 = ddim_sample(self.predict, self.schedule, noise, cond, uncond, steps, guidance)
        return self.decode_latents(x0)

    # -- files ----------------------------------------------------------------------------------------------
    def state_for_save(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, module in (("unet.", self.unet), ("te1.", self.te1), ("te2.", self.te2)):
            for k, v in module.state_dict().items():
                out[prefix + k] = v.detach().to(dtype).contiguous()
        return out

    @staticmethod
    def load(path: str | Path) -> ToyXL:
        from safetensors.torch import load_file

        model = ToyXL()
        state = load_file(str(path))
        for prefix, module in (("unet.", model.unet), ("te1.", model.te1), ("te2.", model.te2)):
            sub = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(sub, strict=True)
        model.eval().requires_grad_(False)
        return model


def untrained_toy(seed: int = 0) -> ToyXL:
    """A random ToyXL whose zero-initialised layers are re-drawn, so every layer (and LoRA) changes the output.

    The tiny untrained model the core's tests run the whole loop on.
    """
    torch.manual_seed(seed)
    model = ToyXL()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.unet.named_modules():
            if name.endswith("out_layers.3") or name.endswith("proj_out") or name == "out.2":
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) / fan_in**0.5)
    return model.eval().requires_grad_(False)
