"""CLIP text encoders with Hugging Face ``CLIPTextModel`` module names (``text_model.encoder.layers.N...``).

SDXL's two text encoders as LoRA files name them (kohya ``lora_te1_`` / ``lora_te2_``, diffusers
``text_encoder`` / ``text_encoder_2``), at any size: ``TextEncoderConfig.sdxl_te1()`` / ``sdxl_te2()`` give
SDXL's, ``ziplora.architecture.toyxl`` the toy model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TextEncoderConfig", "CLIPTextModel"]


@dataclass(frozen=True)
class TextEncoderConfig:
    """The hyper-parameters that decide a CLIP text encoder's module tree (the MLP is 4x the width)."""

    vocab_size: int = 64
    max_length: int = 16
    width: int = 32
    layers: int = 2
    heads: int = 2
    projection_dim: int | None = None  # te2 carries a text_projection, as CLIPTextModelWithProjection
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @staticmethod
    def sdxl_te1() -> TextEncoderConfig:
        """SDXL's first text encoder: OpenAI CLIP ViT-L/14's text tower (sgm ``FrozenCLIPEmbedder``)."""
        return TextEncoderConfig(vocab_size=49408, max_length=77, width=768, layers=12, heads=12)

    @staticmethod
    def sdxl_te2() -> TextEncoderConfig:
        """SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower with its projection, in HF names."""
        return TextEncoderConfig(vocab_size=49408, max_length=77, width=1280, layers=32, heads=20, projection_dim=1280)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class CLIPMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width * 4)
        self.fc2 = nn.Linear(width * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = CLIPMLP(width)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(width, heads) for _ in range(layers)])


class CLIPEmbeddings(nn.Module):
    def __init__(self, vocab: int, length: int, width: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(length, width)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg.vocab_size, cfg.max_length, cfg.width)
        self.encoder = CLIPEncoder(cfg.width, cfg.layers, cfg.heads)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """Returns (penultimate hidden states, pooled output), as SDXL's two encoders are used."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    def forward(self, tokens: torch.Tensor, eos_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tm = self.text_model
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = tm.embeddings.token_embedding(tokens) + tm.embeddings.position_embedding(positions)[None]
        penultimate = x
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x)
            if i == len(tm.encoder.layers) - 2:
                penultimate = x
        last = tm.final_layer_norm(x)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos_index]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return penultimate, pooled
