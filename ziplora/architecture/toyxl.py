"""ToyXL's architecture: the sgm UNet and CLIP classes at the bundled toy model's (small) sizes.

The toy world (``ziplora.toy``) builds, trains and renders with these configurations; the formats read ToyXL
LoRAs against the weight shapes they give (:func:`toyxl_shapes`), without importing the toy world.
"""

from __future__ import annotations

import functools

import torch

from ziplora.architecture.clip_text import CLIPTextModel, TextEncoderConfig
from ziplora.architecture.sgm_unet import UNetConfig, UNetModel
from ziplora.architecture.shapes import Shapes, encoder_layer_shapes, weight_shapes

__all__ = ["VOCAB_SIZE", "TE1_CONFIG", "TE2_CONFIG", "LATENT_FACTOR", "SIZE_EMBED_DIM", "UNET_CONFIG", "toyxl_shapes"]

VOCAB_SIZE = 64  # room for words added later without changing the trained embedding tables
TE1_CONFIG = TextEncoderConfig(vocab_size=VOCAB_SIZE, max_length=16, width=32, layers=3, heads=2)
TE2_CONFIG = TextEncoderConfig(vocab_size=VOCAB_SIZE, max_length=16, width=64, layers=3, heads=4, projection_dim=64)
LATENT_FACTOR = 2  # the toy "VAE": an exact space-to-depth of the 32x32 RGB image into 12 x 16 x 16
SIZE_EMBED_DIM = 8  # SDXL uses 256 per size number; six numbers (original h/w, crop top/left, target h/w)
UNET_CONFIG = UNetConfig(
    in_channels=3 * LATENT_FACTOR**2,
    out_channels=3 * LATENT_FACTOR**2,
    model_channels=32,
    channel_mult=(1, 1, 2),
    num_res_blocks=2,
    transformer_depth=(0, 1, 1),
    transformer_depth_middle=1,
    context_dim=TE1_CONFIG.width + TE2_CONFIG.width,
    adm_in_channels=(TE2_CONFIG.projection_dim or 0) + 6 * SIZE_EMBED_DIM,
    num_head_channels=16,
    norm_groups=8,
)


@functools.lru_cache(maxsize=1)
def toyxl_shapes() -> dict[str, Shapes]:
    """Per component (unet, te1, te2), the weight shape of every Linear / conv a ToyXL LoRA may target.

    Computed from the classes on the meta device (no memory); te2's text_projection is not a target here.
    """
    with torch.device("meta"):
        unet, te1, te2 = UNetModel(UNET_CONFIG), CLIPTextModel(TE1_CONFIG), CLIPTextModel(TE2_CONFIG)
    return {"unet": weight_shapes(unet), "te1": encoder_layer_shapes(te1), "te2": encoder_layer_shapes(te2)}
