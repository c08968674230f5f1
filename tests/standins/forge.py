"""A stand-in of exactly the Forge 2 surface ``ziplora/hosts/forge/`` uses, built on the toy model.

``install(lora_dir)`` puts fake ``modules.*``, ``modules_forge.*``, ``backend.*`` and ``networks`` modules into
``sys.modules`` (``uninstall()`` takes them out again and restores whatever was there). Every class and
function says which Forge file and function it mirrors (lllyasviel/stable-diffusion-webui-forge, main @
dfdcbab). What matters is reproduced, including the hazards the adapter must handle: weights built as
inference tensors with ``requires_grad=True``, a Linear that is no ``nn.Linear``, LoRAs baked into new
Parameter objects with backups (or merged on the fly under inference mode), in-place residuals in the
transformer blocks, a lazy model, a registry of loaded patchers that may unload the UNet or load it only
partly. The networks are the toy's (``ziplora.toy``), everything runs on the CPU in fp32.

The LoRA key maps (``forge_unet_key_map``, ``forge_clip_key_map``, ``forge_load_lora``) are re-derived from
``packages_3rdparty/comfyui_lora_collection/lora.py`` for the SDXL case and are also what the key-mapping test
checks our written files against.
"""

from __future__ import annotations

import copy
import functools
import re
import sys
import threading
import types
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.standins.textual_inversion import (
    EXPECTED_SHAPE,
    EmbeddingsWithFixes,
    ForgeEmbeddingDatabase,
    create_embedding_from_data,
    splice_embeddings,
)
from ziplora.architecture.sgm_unet import BasicTransformerBlock, UNetModel, timestep_embedding
from ziplora.schedule import NoiseSchedule, ddim_sample
from ziplora.toy.pipeline import SIZE_EMBED_DIM, ToyXL

__all__ = ["install", "uninstall", "World", "build_sdxl", "build_engine", "GGUFLinear", "BnbLinear", "ForgeLinear",
           "forge_unet_key_map", "forge_clip_key_map", "forge_load_lora", "LORA_CLIP_MAP"]  # fmt: skip

WORLD: World | None = None


def world() -> World:
    assert WORLD is not None, "the Forge stand-in is not installed"
    return WORLD


# =========================================================================================================
# backend/operations.py


class ForgeLinear(nn.Module):
    """``backend/operations.py`` ``ForgeOperations.Linear``: a ``torch.nn.Module``, not a ``torch.nn.Linear``,
    with ``in_features``, ``out_features``, ``weight``, ``bias``, ``scale_weight`` and
    ``parameters_manual_cast``; ``forward`` goes through ``get_weight_and_bias`` (online LoRAs merged there)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.scale_weight = None
        self.parameters_manual_cast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = get_weight_and_bias(self)
        if self.parameters_manual_cast:
            weight = weight.to(x)
            bias = None if bias is None else bias.to(x)
        return F.linear(x, weight, bias)


def get_weight_and_bias(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``backend/operations.py`` ``get_weight_and_bias``: the stored weight, with ``forge_online_loras``
    merged in by ``merge_lora_to_weight`` (an inference-mode function) when a LoRA is applied on the fly."""
    patches = getattr(layer, "forge_online_loras", None)
    weight = layer.weight
    if patches is not None and "weight" in patches:
        weight = merge_lora_to_weight(patches["weight"], weight)
    return weight, layer.bias


class _QuantFormat:
    """``packages_3rdparty/gguf/quants.py`` (a ``gguf_cls``): ``dequantize_pytorch(parameter)``; here int8 rows
    with one fp32 scale each."""

    @staticmethod
    def dequantize_pytorch(p: torch.Tensor) -> torch.Tensor:
        return p.data.float() * p.gguf_scale  # type: ignore[attr-defined]


def _quantise_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
    return (weight / scale).round().clamp(-127, 127).to(torch.int8), scale.float()


class GGUFLinear(nn.Module):
    """``backend/operations.py`` ``ForgeOperationsGGUF.Linear``: no ``in_features`` / ``out_features``; its
    ``weight`` is a ``ParameterGGUF`` (``backend/operations_gguf.py``) whose ``gguf_cls`` dequantises it, and
    ``forward`` dequantises (``dequantize_tensor``) then calls ``F.linear``."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        q, scale = _quantise_rows(source.weight.detach().float())
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight.gguf_cls = _QuantFormat()  # type: ignore[attr-defined]
        self.weight.gguf_scale = scale  # type: ignore[attr-defined]
        bias = getattr(source, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.parameters_manual_cast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_tensor(self.weight).to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def dequantize_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``backend/operations_gguf.py`` ``dequantize_tensor``."""
    cls = getattr(tensor, "gguf_cls", None)
    return tensor if cls is None else cls.dequantize_pytorch(tensor)


class _NoBackward(torch.autograd.Function):
    """Stands for ``bnb.matmul_4bit`` where its backward cannot run (bitsandbytes without CUDA)."""

    @staticmethod
    def forward(ctx, x, weight):  # type: ignore[no-untyped-def]
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        raise RuntimeError("BNB Must Use CUDA as Computation Device!")


class BnbLinear(nn.Module):
    """``backend/operations.py`` ``ForgeOperationsBNB4bits.Linear`` (a ``ForgeLoader4Bit``): no
    ``in_features``; the weight is a packed ``ForgeParams4bit`` (uint8 [n, 1]) whose ``quant_state.shape`` is
    the layer's; ``forward`` is ``functional_linear_4bits`` (``bnb.matmul_4bit``)."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        w = source.weight.detach().float()
        packed = torch.zeros(w.numel() // 2, 1, dtype=torch.uint8)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight.quant_state = types.SimpleNamespace(shape=torch.Size(w.shape))  # type: ignore[attr-defined]
        self.weight.bnb_quantized = True  # type: ignore[attr-defined]
        self._dequantised = w.clone()
        self.bias = None
        self.parameters_manual_cast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoBackward.apply(x, self._dequantised.to(x.dtype))


# =========================================================================================================
# backend/nn/unet.py and backend/nn/clip.py


class ForgeTransformerBlock(BasicTransformerBlock):
    """``backend/nn/unet.py`` ``BasicTransformerBlock._forward``: residuals added in place (``x += n``) after
    attn1, attn2 and the feed-forward, as Forge does."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, transformer_options: dict | None = None) -> torch.Tensor:  # type: ignore[override]
        n = self.attn1(self.norm1(x))
        x += n
        n = self.attn2(self.norm2(x), context)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


class IntegratedUNet(UNetModel):
    """``backend/nn/unet.py`` ``IntegratedUNet2DConditionModel``: sgm module names; called as
    ``forward(x, timesteps, context=, y=, control=None, transformer_options={})``; its ``checkpoint()`` raises
    ``NotImplementedError`` when enabled, so no built-in gradient checkpointing."""

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # type: ignore[no-untyped-def,override]  # noqa: B006
        return super().forward(x, timesteps, context, y)


class IntegratedCLIP(nn.Module):
    """``backend/nn/clip.py`` ``IntegratedCLIP``: ``.transformer`` is the CLIP text model (HF names)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.logit_scale = nn.Parameter(torch.tensor(4.6055))


# =========================================================================================================
# backend/modules/k_model.py, k_prediction.py


class Prediction(nn.Module):
    """``backend/modules/k_prediction.py`` ``Prediction``: buffers ``alphas_cumprod``, ``sigmas``,
    ``log_sigmas``; ``prediction_type`` 'epsilon' or 'v_prediction'."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.prediction_type = prediction_type
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())


class KModel(nn.Module):
    """``backend/modules/k_model.py`` ``KModel``: ``diffusion_model``, ``predictor``, ``storage_dtype``,
    ``computation_dtype``, ``memory_required(input_shape)``."""

    def __init__(self, diffusion_model: nn.Module, predictor: Prediction, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = predictor
        self.storage_dtype = dtype
        self.computation_dtype = dtype

    def memory_required(self, input_shape: list[int]) -> float:
        area = input_shape[0] * input_shape[2] * input_shape[3]
        return 1.28 * area * 4 * 16384


# =========================================================================================================
# backend/patcher/lora.py, base.py, unet.py, clip.py, vae.py


@torch.inference_mode()
def merge_lora_to_weight(
    patches: list, weight: torch.Tensor, key: str = "online_lora", computation_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``backend/patcher/lora.py`` ``merge_lora_to_weight`` (kohya "lora" patches only): an inference-mode
    function, so its output is an inference tensor."""
    w = weight.to(computation_dtype).clone()
    for strength, (kind, values), strength_model, _offset, _function in patches:
        if kind != "lora":
            raise NotImplementedError(kind)
        up, down, alpha, _mid, _dora = values
        rank = down.shape[0]
        scale = (alpha / rank) if alpha is not None else 1.0
        delta = up.flatten(1).to(computation_dtype) @ down.flatten(1).to(computation_dtype)
        if strength_model != 1.0:
            w *= strength_model
        w += strength * scale * delta.reshape(w.shape)
    return w.to(weight.dtype)


def _get_attr_with_parent(obj: Any, attr: str) -> tuple[Any, str, Any]:
    """``backend/utils.py`` ``get_attr_with_parent``."""
    parent, name = obj, ""
    for name in attr.split("."):
        parent, obj = obj, getattr(obj, name)
    return parent, name, obj


def _set_attr_raw(obj: Any, attr: str, value: Any) -> None:
    """``backend/utils.py`` ``set_attr_raw``."""
    *path, last = attr.split(".")
    for name in path:
        obj = getattr(obj, name)
    setattr(obj, last, value)


class LoraLoader:
    """``backend/patcher/lora.py`` ``LoraLoader``: attached to the torch model and shared by all its patchers.
    ``refresh`` restores the backed-up originals, then bakes every patch into a NEW Parameter (backing up the
    old one by key) or, online, hangs ``forge_online_loras`` on the layer; skipped when the patch list is
    unchanged (``loaded_hash``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.backup: dict[str, torch.Tensor] = {}
        self.online_backup: list[nn.Module] = []
        self.loaded_hash = str([])
        self.refreshes = 0  # stand-in only: how often LoRAs were (re)applied

    @torch.inference_mode()
    def refresh(self, lora_patches: dict, offload_device: torch.device = torch.device("cpu"), force_refresh: bool = False) -> None:
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.refreshes += 1
        merged: dict[tuple[str, bool], list] = {}
        for (_, _, _, online), patches in lora_patches.items():
            for key, current in patches.items():
                merged[(key, online)] = merged.get((key, online), []) + current
        for module in set(self.online_backup):
            del module.forge_online_loras
        self.online_backup = []
        for key, w in self.backup.items():
            _set_attr_raw(self.model, key, w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False))
        self.backup = {}
        for (key, online), current in merged.items():
            parent, child, weight = _get_attr_with_parent(self.model, key)
            assert isinstance(weight, nn.Parameter), key
            if online:
                if not hasattr(parent, "forge_online_loras"):
                    parent.forge_online_loras = {}
                parent.forge_online_loras[child] = current
                self.online_backup.append(parent)
                continue
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            _set_attr_raw(self.model, key, nn.Parameter(merge_lora_to_weight(current, weight, key), requires_grad=False))
        self.loaded_hash = hashes


class ModelPatcher:
    """``backend/patcher/base.py`` ``ModelPatcher``: ``model``, ``lora_patches`` keyed by
    (filename, strength, strength_model, online), ``clone()``, ``is_clone``, ``add_patches``,
    ``refresh_loras``, ``load_device`` / ``offload_device``."""

    def __init__(self, model: nn.Module, load_device: torch.device, offload_device: torch.device) -> None:
        self.model = model
        self.lora_patches: dict = {}
        self.model_options: dict = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader: LoraLoader = model.lora_loader

    def clone(self) -> ModelPatcher:
        n = type(self)(self.model, self.load_device, self.offload_device)
        n.lora_patches = self.lora_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def is_clone(self, other: Any) -> bool:
        return getattr(other, "model", None) is self.model

    def add_patches(
        self, *, filename: str, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0, online_mode: bool = False
    ) -> set:
        model_keys = {k for k, _ in self.model.named_parameters()}
        this: dict[str, list] = {}
        loaded = set()
        for key, patch in patches.items():
            if key in model_keys:
                loaded.add(key)
                this.setdefault(key, []).append([strength_patch, patch, strength_model, None, None])
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = this
        return loaded

    def refresh_loras(self) -> None:
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)

    def memory_required(self, input_shape: list[int]) -> float:
        return self.model.memory_required(input_shape=input_shape)


class UnetPatcher(ModelPatcher):
    """``backend/patcher/unet.py`` ``UnetPatcher`` (``.model`` is the ``KModel``)."""


class JointTextEncoder(nn.Module):
    """``backend/patcher/clip.py`` ``JointTextEncoder`` (``backend/nn/base.py`` ``ModuleDict``): a plain
    ``nn.Module`` holding ``clip_l`` / ``clip_g`` as attributes (no ``[]`` access, unlike ``nn.ModuleDict``)."""

    def __init__(self, encoders: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in encoders.items():
            self.add_module(name, module)


class CLIP:
    """``backend/patcher/clip.py`` ``CLIP``: ``cond_stage_model`` (a ``JointTextEncoder`` with ``clip_l`` /
    ``clip_g``), ``patcher``, ``clone()``, ``add_patches``."""

    def __init__(self, encoders: dict[str, nn.Module] | None = None, device: torch.device = torch.device("cpu")) -> None:
        if encoders is None:
            return
        self.cond_stage_model = JointTextEncoder(encoders)
        self.patcher = ModelPatcher(self.cond_stage_model, device, device)

    def clone(self) -> CLIP:
        n = CLIP()
        n.cond_stage_model = self.cond_stage_model
        n.patcher = self.patcher.clone()
        return n

    def add_patches(self, **kwargs: Any) -> set:
        return self.patcher.add_patches(**kwargs)


class _FirstStage(nn.Module):
    """The toy's exact "VAE" (space-to-depth by 2) with a parameter, so Forge can load it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))


class VAE:
    """``backend/patcher/vae.py`` ``VAE``: ``latent_channels``, ``downscale_ratio``; ``encode`` / ``decode``
    load its patcher through ``load_models_gpu`` first (which may unload the UNet)."""

    latent_channels = 12
    downscale_ratio = 2

    def __init__(self) -> None:
        self.first_stage_model = _FirstStage()
        self.patcher = ModelPatcher(self.first_stage_model, torch.device("cpu"), torch.device("cpu"))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        load_models_gpu([self.patcher])
        return F.pixel_unshuffle(images, self.downscale_ratio)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        load_models_gpu([self.patcher])
        return F.pixel_shuffle(latents, self.downscale_ratio)


# =========================================================================================================
# backend/memory_management.py


class LoadedModel:
    """``backend/memory_management.py`` ``LoadedModel``: equal by patcher identity; ``model_load`` ends with
    ``patcher.refresh_loras()``; ``model_accelerated`` is True when only part was loaded (CPU swap)."""

    def __init__(self, model: ModelPatcher) -> None:
        self.model = model
        self.model_accelerated = False
        self.device = model.load_device

    def model_load(self, swap: bool) -> nn.Module:
        self.model_accelerated = swap
        self.model.refresh_loras()
        return self.model.model

    def model_unload(self, avoid_model_moving: bool = False) -> None:
        self.model_accelerated = False
        world().unloads += 1

    def __eq__(self, other: object) -> bool:
        return self.model is getattr(other, "model", None)

    __hash__ = object.__hash__


def unload_model_clones(model: ModelPatcher) -> None:
    """``backend/memory_management.py`` ``unload_model_clones``: drop entries over the same torch model."""
    models = world().current_loaded_models
    for i in reversed([i for i, m in enumerate(models) if model.is_clone(m.model)]):
        models.pop(i).model_unload(avoid_model_moving=True)


def free_memory(memory_required: float, device: torch.device, keep_loaded: Iterable[LoadedModel] = ()) -> None:
    """``backend/memory_management.py`` ``free_memory``: unloads models not kept while memory is short; the
    knob ``World.memory_pressure`` says it always is."""
    w = world()
    if not w.memory_pressure:
        return
    keep = list(keep_loaded)
    for i in range(len(w.current_loaded_models) - 1, -1, -1):
        if w.current_loaded_models[i] not in keep:
            w.current_loaded_models.pop(i).model_unload()


def load_models_gpu(models: list[ModelPatcher], memory_required: float = 0, hard_memory_preservation: float = 0) -> None:
    """``backend/memory_management.py`` ``load_models_gpu``: already loaded -> moved to the front; otherwise
    clones of the same torch model are unloaded, memory freed, then ``LoadedModel.model_load``."""
    w = world()
    w.load_calls.append(([type(m).__name__ for m in models], memory_required))
    to_load, already = [], []
    for m in models:
        entry = LoadedModel(m)
        if entry in w.current_loaded_models:
            w.current_loaded_models.insert(0, w.current_loaded_models.pop(w.current_loaded_models.index(entry)))
            already.append(entry)
        else:
            to_load.append(entry)
    if not to_load:
        free_memory(memory_required, torch.device("cpu"), already)
        return
    for entry in to_load:
        unload_model_clones(entry.model)
    free_memory(memory_required, torch.device("cpu"), already)
    for entry in to_load:
        entry.model_load(swap=w.cpu_swap and isinstance(entry.model, UnetPatcher))
        w.current_loaded_models.insert(0, entry)


def load_model_gpu(model: ModelPatcher) -> None:
    """``backend/memory_management.py`` ``load_model_gpu``."""
    load_models_gpu([model])


# =========================================================================================================
# backend/diffusion_engine/base.py, sdxl.py


class ForgeObjects:
    """``backend/diffusion_engine/base.py`` ``ForgeObjects``: unet, clip, vae, clipvision; ``shallow_copy``."""

    def __init__(self, unet: Any, clip: Any, vae: Any, clipvision: Any = None) -> None:
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ClassicTextProcessingEngine:
    """``backend/text_processing/classic_engine.py`` ``ClassicTextProcessingEngine``: an ``EmbeddingDatabase`` of its
    own (filled from the embeddings folder at load; empty here), the encoder's token embedding wrapped in
    ``CLIPEmbeddingForTextualInversion`` (key ``clip_l`` or ``clip_g``); a call finds the embeddings in the prompts,
    leaves their fixes on the database and encodes (here: the toy encoder's penultimate states and pooled output)."""

    def __init__(self, text_encoder: nn.Module, tokenizer: Callable, embedding_key: str) -> None:
        self.embeddings = ForgeEmbeddingDatabase(EXPECTED_SHAPE)  # sdxl.py: embedding_expected_shape=2048 for both
        self.embedding_key = embedding_key
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        model_embeddings = text_encoder.transformer.text_model.embeddings
        model_embeddings.token_embedding = EmbeddingsWithFixes(model_embeddings.token_embedding, self.embeddings, embedding_key)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        words, fixes = splice_embeddings(texts, self.embeddings)
        tokens, eos = self.tokenizer(words)
        self.embeddings.fixes = fixes
        return self.text_encoder.transformer(tokens, eos)


class StableDiffusionXL:
    """``backend/diffusion_engine/sdxl.py`` ``StableDiffusionXL``: ``forge_objects`` (+ ``_original``,
    ``_after_applying_lora``), ``current_lora_hash``, ``is_sdxl``; ``get_learned_conditioning`` /
    ``encode_first_stage`` / ``decode_first_stage`` are inference-mode methods on ``forge_objects``."""

    is_sdxl = True
    is_sd1 = is_sd2 = is_sd3 = False

    def __init__(self, objects: ForgeObjects, tokenizer: Callable) -> None:
        encoders = objects.clip.cond_stage_model
        if hasattr(encoders, "clip_l"):  # the refiner has only clip_g
            self.text_processing_engine_l = ClassicTextProcessingEngine(encoders.clip_l, tokenizer, "clip_l")
        self.text_processing_engine_g = ClassicTextProcessingEngine(encoders.clip_g, tokenizer, "clip_g")
        self.forge_objects = objects
        self.forge_objects_original = objects.shallow_copy()
        self.forge_objects_after_applying_lora = objects.shallow_copy()
        self.current_lora_hash = str([])
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]) -> dict[str, torch.Tensor]:
        load_model_gpu(self.forge_objects.clip.patcher)
        cond_l, _ = self.text_processing_engine_l(list(prompt))
        cond_g, pooled = self.text_processing_engine_g(list(prompt))
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        opts = sys.modules["modules.shared"].opts
        sizes = torch.tensor([height, width, opts.sdxl_crop_top, opts.sdxl_crop_left, height, width], dtype=torch.float32)
        flat = timestep_embedding(sizes, SIZE_EMBED_DIM).reshape(1, -1).repeat(pooled.shape[0], 1).to(pooled)
        if getattr(prompt, "is_negative_prompt", False) and all(p == "" for p in prompt):
            cond_l, cond_g, pooled = torch.zeros_like(cond_l), torch.zeros_like(cond_g), torch.zeros_like(pooled)
        return {"crossattn": torch.cat([cond_l, cond_g], dim=2), "vector": torch.cat([pooled, flat], dim=1)}

    @torch.inference_mode()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.forge_objects.vae.encode(x).to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.forge_objects.vae.decode(x).to(x)


class StableDiffusionXLRefiner(StableDiffusionXL):
    """``backend/diffusion_engine/sdxl.py`` ``StableDiffusionXLRefiner``: ``is_sdxl`` True, only ``clip_g``."""


class StableDiffusion(StableDiffusionXL):
    """``backend/diffusion_engine/sd15.py`` ``StableDiffusion``: ``is_sd1``, not SDXL."""

    is_sdxl = False
    is_sd1 = True


def _forgeify(module: nn.Module) -> None:
    """Every toy ``nn.Linear`` -> ``ForgeLinear`` (as ``using_forge_operations`` swaps ``torch.nn.Linear``)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            new = ForgeLinear(child.in_features, child.out_features, child.bias is not None)
            new.weight = nn.Parameter(child.weight.detach().clone())
            new.bias = None if child.bias is None else nn.Parameter(child.bias.detach().clone())
            setattr(module, name, new)
        else:
            _forgeify(child)


@torch.inference_mode()
def _as_inference(module: nn.Module) -> None:
    """``backend/loader.py`` ``forge_loader`` runs under ``torch.inference_mode()``: every parameter and buffer
    is an inference tensor, parameters with the default ``requires_grad=True``."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            new = nn.Parameter(p.data.clone(), requires_grad=p.requires_grad if not p.is_floating_point() else True)
            for attr, value in p.__dict__.items():
                setattr(new, attr, value)
            m._parameters[name] = new
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.clone()


def build_sdxl(toy: ToyXL, gguf: Iterable[str] = (), bnb: Iterable[str] = (), engine: type = StableDiffusionXL,
               prediction_type: str = "epsilon") -> StableDiffusionXL:  # fmt: skip
    """An engine over ``toy`` shaped as Forge builds SDXL; ``gguf`` / ``bnb`` name UNet Linears to quantise."""
    unet, te1, te2 = toy.unet, toy.te1, toy.te2
    _forgeify(unet)
    _forgeify(te1)
    _forgeify(te2)
    for path, cls in [*((p, GGUFLinear) for p in gguf), *((p, BnbLinear) for p in bnb)]:
        parent_path, _, attr = path.rpartition(".")
        parent = unet.get_submodule(parent_path)
        setattr(parent, attr, cls(getattr(parent, attr)))
    for m in unet.modules():
        if isinstance(m, BasicTransformerBlock):
            m.__class__ = ForgeTransformerBlock
    unet.__class__ = IntegratedUNet
    kmodel = KModel(unet, Prediction(toy.schedule.alphas_cumprod.clone(), prediction_type))
    encoders = {"clip_l": IntegratedCLIP(te1), "clip_g": IntegratedCLIP(te2)}
    if engine is StableDiffusionXLRefiner:
        encoders.pop("clip_l")
    clip = CLIP(encoders)
    for m in (kmodel, clip.cond_stage_model):
        _as_inference(m)
    cpu = torch.device("cpu")
    objects = ForgeObjects(UnetPatcher(kmodel, cpu, cpu), clip, VAE())
    return engine(objects, toy.tokenizer)


def build_engine(seed: int = 0, **kwargs: Any) -> StableDiffusionXL:
    from ziplora.toy.pipeline import untrained_toy

    return build_sdxl(untrained_toy(seed=seed), **kwargs)


# =========================================================================================================
# packages_3rdparty/comfyui_lora_collection/lora.py (the SDXL parts), used by networks.load_networks

LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def forge_unet_key_map(kmodel_state_keys: Iterable[str]) -> dict[str, str]:
    """``model_lora_keys_unet``, sgm part: for every ``diffusion_model.<path>.weight`` of the KModel state dict,
    ``lora_unet_<path with . -> _>`` (and ``diffusion_model.<path>``) name it. (Its diffusers-named aliases,
    ``lora_unet_down_blocks_...``, are not needed for our sgm-named files.)"""
    out: dict[str, str] = {}
    for k in kmodel_state_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            path = k[len("diffusion_model.") : -len(".weight")]
            out["lora_unet_" + path.replace(".", "_")] = k
            out[k[: -len(".weight")]] = k
    return out


def forge_clip_key_map(clip_state_keys: Iterable[str]) -> dict[str, str]:
    """``model_lora_keys_clip``, SDXL part: ``lora_te1_text_model_encoder_layers_{b}_{c}`` -> clip_l,
    ``lora_te2_...`` -> clip_g (only when clip_l is present), for b < 32 and c in ``LORA_CLIP_MAP``;
    ``lora_te2_text_projection`` -> ``clip_g.transformer.text_projection.weight``."""
    keys = set(clip_state_keys)
    out: dict[str, str] = {}
    clip_l_present = False
    for b in range(32):
        for c, kohya in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in keys:
                out[f"lora_te1_text_model_encoder_layers_{b}_{kohya}"] = k
                clip_l_present = True
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in keys and clip_l_present:
                out[f"lora_te2_text_model_encoder_layers_{b}_{kohya}"] = k
    if "clip_g.transformer.text_projection.weight" in keys:
        out["lora_te2_text_projection"] = "clip_g.transformer.text_projection.weight"
    return out


def forge_load_lora(lora: dict[str, torch.Tensor], to_load: dict[str, str]) -> tuple[dict, dict]:
    """``load_lora``, kohya "lora" part: for each mapped name, consume ``.alpha``, ``.dora_scale``,
    ``.lora_up.weight`` / ``.lora_down.weight`` / ``.lora_mid.weight`` (and ``.diff``); the rest is unmatched."""
    patches: dict[str, tuple] = {}
    used: set[str] = set()
    for name, target in to_load.items():
        alpha = lora.get(f"{name}.alpha")
        if alpha is not None:
            used.add(f"{name}.alpha")
            alpha = float(alpha.item())
        dora = lora.get(f"{name}.dora_scale")
        if dora is not None:
            used.add(f"{name}.dora_scale")
        up, down, mid = (f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.lora_mid.weight")
        if up in lora:
            used |= {up, down} | ({mid} if mid in lora else set())
            patches[target] = ("lora", (lora[up], lora[down], alpha, lora.get(mid), dora))
        if f"{name}.diff" in lora:
            used.add(f"{name}.diff")
            patches[target] = ("diff", (lora[f"{name}.diff"],))
    return patches, {k: v for k, v in lora.items() if k not in used}


# =========================================================================================================
# extensions-builtin/sd_forge_lora/networks.py, network.py


@dataclass
class NetworkOnDisk:
    """``extensions-builtin/sd_forge_lora/network.py`` ``NetworkOnDisk`` (name, filename, alias)."""

    name: str
    filename: str
    alias: str = ""

    def __post_init__(self) -> None:
        self.alias = self.alias or self.name


def _load_state_dict(filename: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    world().file_reads += 1
    return load_file(filename)


def load_lora_for_models(model: UnetPatcher, clip: CLIP, lora: dict, strength_model: float, strength_clip: float,
                         filename: str, online_mode: bool) -> tuple[UnetPatcher, CLIP]:  # fmt: skip
    """``networks.py`` ``load_lora_for_models``: map keys, give up on more than 12 unmatched, patch clones."""
    unet_keys = forge_unet_key_map(model.model.state_dict().keys())
    clip_keys = forge_clip_key_map(clip.cond_stage_model.state_dict().keys())
    lora_unet, rest = forge_load_lora(lora, unet_keys)
    lora_clip, rest = forge_load_lora(rest, clip_keys)
    if len(rest) > 12:
        return model, clip
    new_model, new_clip = model.clone(), clip.clone()
    if lora_unet:
        new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model, online_mode=online_mode)
        model = new_model
    if lora_clip:
        new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip, online_mode=online_mode)
        clip = new_clip
    return model, clip


def _networks_module() -> types.ModuleType:
    w_lora_dir = lambda: Path(sys.modules["modules.shared"].cmd_opts.lora_dir)  # noqa: E731
    mod = types.ModuleType("networks")
    mod.__doc__ = "extensions-builtin/sd_forge_lora/networks.py"
    mod.available_networks = {}
    mod.available_network_aliases = {}
    mod.forbidden_network_aliases = {}
    mod.loaded_networks = []
    mod.networks_in_memory = {}

    def list_available_networks() -> None:
        """``networks.py`` ``list_available_networks``: clear and rescan ``cmd_opts.lora_dir``."""
        world().rescans += 1
        for table in (mod.available_networks, mod.available_network_aliases, mod.forbidden_network_aliases):
            table.clear()
        mod.forbidden_network_aliases.update({"none": 1, "Addams": 1})
        for path in sorted(w_lora_dir().rglob("*.safetensors")):
            entry = NetworkOnDisk(path.stem, str(path))
            mod.available_networks[entry.name] = entry
            if entry.alias in mod.available_network_aliases:
                mod.forbidden_network_aliases[entry.alias.lower()] = 1
            mod.available_network_aliases[entry.name] = entry
            mod.available_network_aliases[entry.alias] = entry

    @functools.lru_cache(maxsize=5)
    def load_lora_state_dict(filename: str) -> dict[str, torch.Tensor]:
        """``networks.py`` ``load_lora_state_dict``: ``functools.lru_cache(maxsize=5)`` keyed by path."""
        return _load_state_dict(filename)

    def load_networks(names: list[str], te_multipliers: list[float], unet_multipliers: list[float], dyn_dims: Any = None) -> None:
        """``networks.py`` ``load_networks``: skip when ``current_lora_hash`` equals the [file, weights, online]
        list; else start from ``forge_objects_original``, patch clones, store ``forge_objects_after_applying_lora``."""
        sd = sys.modules["modules.sd_models"].model_data.get_sd_model()
        if any(mod.available_network_aliases.get(n) is None for n in names):
            list_available_networks()
        on_disk = [mod.available_network_aliases[n] for n in names]
        online = world().online_lora
        targets = [[d.filename, u, t, online] for d, u, t in zip(on_disk, unet_multipliers, te_multipliers, strict=True)]
        if sd.current_lora_hash == str(targets):
            return
        sd.current_lora_hash = str(targets)
        sd.forge_objects.unet = sd.forge_objects_original.unet
        sd.forge_objects.clip = sd.forge_objects_original.clip
        for filename, strength_model, strength_clip, online_mode in targets:
            sd.forge_objects.unet, sd.forge_objects.clip = load_lora_for_models(
                sd.forge_objects.unet, sd.forge_objects.clip, mod.load_lora_state_dict(filename), strength_model,
                strength_clip, filename, online_mode,
            )  # fmt: skip
        sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()

    mod.list_available_networks = list_available_networks
    mod.load_lora_state_dict = load_lora_state_dict
    mod.load_networks = load_networks
    return mod


# =========================================================================================================
# modules/*


class FIFOLock:
    """``modules/fifo_lock.py`` ``FIFOLock`` (``modules/call_queue.py`` ``queue_lock``): waiters get it in order."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._queue: deque[object] = deque()

    def acquire(self, blocking: bool = True) -> bool:
        with self._cond:
            if not self._held and not self._queue:
                self._held = True
                return True
            if not blocking:
                return False
            ticket = object()
            self._queue.append(ticket)
            while self._held or self._queue[0] is not ticket:
                self._cond.wait()
            self._queue.popleft()
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._held

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class State:
    """``modules/shared_state.py`` ``State``: the fields and methods the progress bar and Interrupt use."""

    def __init__(self) -> None:
        self.skipped = self.interrupted = self.stopping_generation = False
        self.job, self.job_no, self.job_count = "", 0, 0
        self.sampling_step = self.sampling_steps = 0
        self.textinfo: str | None = None
        self.begun = self.ended = 0  # stand-in only
        self.seen: list[str] = []  # stand-in only: textinfo values seen

    def begin(self, job: str = "(unknown)") -> None:
        self.begun += 1
        self.sampling_step, self.job_count, self.job_no = 0, -1, 0
        self.skipped = self.interrupted = self.stopping_generation = False
        self.textinfo, self.job = None, job

    def end(self) -> None:
        self.ended += 1
        self.job, self.job_count = "", 0

    def interrupt(self) -> None:
        self.interrupted = True

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "textinfo" and value and "seen" in self.__dict__:
            self.seen.append(value)
        super().__setattr__(name, value)


class FakeInitialModel:
    """``modules/sd_models.py`` ``FakeInitialModel``: what ``model_data.sd_model`` is before the first load."""

    def __init__(self) -> None:
        self.cond_stage_model = None


class SdModelData:
    """``modules/sd_models.py`` ``SdModelData``."""

    def __init__(self) -> None:
        self.sd_model: Any = FakeInitialModel()

    def get_sd_model(self) -> Any:
        return self.sd_model


@torch.inference_mode()
def forge_model_reload() -> tuple[Any, bool]:
    """``modules/sd_models.py`` ``forge_model_reload`` (inference mode): builds the model on first use."""
    w = world()
    data = sys.modules["modules.sd_models"].model_data
    if isinstance(data.sd_model, FakeInitialModel):
        w.model_loads += 1
        with torch.inference_mode(False):
            data.sd_model = w.factory()
        return data.sd_model, True
    return data.sd_model, False


class SdConditioning(list):
    """``modules/prompt_parser.py`` ``SdConditioning``: prompts plus ``is_negative_prompt``, width, height."""

    def __init__(self, prompts: list[str], is_negative_prompt: bool = False, width: int | None = None, height: int | None = None,
                 copy_from: Any = None, distilled_cfg_scale: float | None = None) -> None:  # fmt: skip
        super().__init__(prompts)
        self.is_negative_prompt = is_negative_prompt
        self.width, self.height = width, height


class StableDiffusionProcessingTxt2Img:
    """``modules/processing.py`` ``StableDiffusionProcessingTxt2Img``: the fields a render sets."""

    def __init__(self, **kwargs: Any) -> None:
        defaults = dict(prompt="", negative_prompt="", seed=-1, subseed=-1, subseed_strength=0, sampler_name=None,
                        scheduler=None, batch_size=1, n_iter=1, steps=50, cfg_scale=7.0, width=512, height=512,
                        do_not_save_samples=False, do_not_save_grid=False, sd_model=None)  # fmt: skip
        unknown = set(kwargs) - set(defaults)
        assert not unknown, f"StableDiffusionProcessingTxt2Img has no {unknown}"
        self.__dict__.update({**defaults, **kwargs})
        self.scripts = None
        self.closed = False

    def close(self) -> None:
        self.closed = True


@dataclass
class Processed:
    """``modules/processing.py`` ``Processed`` (images as PIL)."""

    images: list
    index_of_first_image: int = 0


_LORA = re.compile(r"<lora:([^:>]+):([^>]+)>")


def process_images(p: StableDiffusionProcessingTxt2Img) -> Processed:
    """``modules/processing.py`` ``process_images``: reload the model, reset to ``forge_objects_original``,
    activate extra networks (``networks.load_networks``), use ``forge_objects_after_applying_lora``, encode,
    sample (stops on ``state.interrupted``), decode. Here DDIM on the toy UNet."""
    from PIL import Image

    w = world()
    w.renders.append(p)
    sd, _ = forge_model_reload()
    prompts = list(p.prompt) if isinstance(p.prompt, list) else [p.prompt] * p.batch_size
    found = [_LORA.findall(prompt) for prompt in prompts]
    names = [name for name, _ in found[0]]
    weights = [float(weight) for _, weight in found[0]]
    clean = [_LORA.sub("", prompt).strip() for prompt in prompts]
    sd.forge_objects = sd.forge_objects_original.shallow_copy()
    sys.modules["networks"].load_networks(names, weights, weights, None)
    sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
    seeds = p.seed if isinstance(p.seed, list) else [p.seed + i for i in range(len(prompts))]
    state = sys.modules["modules.shared"].state
    with torch.inference_mode():
        cond = sd.get_learned_conditioning(SdConditioning(clean, width=p.width, height=p.height))
        uncond = sd.get_learned_conditioning(
            SdConditioning([p.negative_prompt] * len(clean), is_negative_prompt=True, width=p.width, height=p.height)
        )
        unet = sd.forge_objects.unet
        load_models_gpu([unet])
        vae = sd.forge_objects.vae
        shape = (vae.latent_channels, p.height // vae.downscale_ratio, p.width // vae.downscale_ratio)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        schedule = NoiseSchedule(unet.model.predictor.alphas_cumprod.float(), unet.model.predictor.prediction_type)

        def predict(x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
            return unet.model.diffusion_model(x, t.float(), context=c["crossattn"], y=c["vector"])

        x0 = ddim_sample(predict, schedule, noise, cond, uncond, p.steps, p.cfg_scale)
        if state.interrupted:
            return Processed([])
        images = ((sd.decode_first_stage(x0) + 1) / 2).clamp(0, 1)
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return Processed([Image.fromarray(a) for a in arrays])


# =========================================================================================================
# modules_forge/main_thread.py


def _main_thread_module() -> types.ModuleType:
    mod = types.ModuleType("modules_forge.main_thread")
    mod.__doc__ = "modules_forge/main_thread.py: one worker thread runs queued tasks (loop() is not running here)"
    mod.waiting_list = []
    mod.finished_list = []
    mod.last_exception = None

    def async_run(func: Callable, *args: Any, **kwargs: Any) -> int:
        """``main_thread.async_run``: queue a task for ``loop()``."""
        mod.waiting_list.append((func, args, kwargs))
        return len(mod.waiting_list)

    def run_and_wait_result(func: Callable, *args: Any, **kwargs: Any) -> Any:
        """``main_thread.run_and_wait_result``: would block until ``loop()`` ran the task; ``loop()`` never runs
        in the tests, so the adapter must not depend on it."""
        async_run(func, *args, **kwargs)
        raise AssertionError("run_and_wait_result would block forever: Forge's main loop is not running")

    mod.async_run = async_run
    mod.run_and_wait_result = run_and_wait_result
    return mod


# =========================================================================================================
# installing


@dataclass
class World:
    """Everything one install holds, with the knobs tests turn and the counters they read."""

    lora_dir: Path
    factory: Callable[[], Any]
    memory_pressure: bool = False  # free_memory unloads every model it is not told to keep
    cpu_swap: bool = False  # the UNet loads only partly (LoadedModel.model_accelerated)
    online_lora: bool = False  # LoRAs applied on the fly (forge_online_loras), as on low-bit models
    current_loaded_models: list = field(default_factory=list)
    load_calls: list = field(default_factory=list)
    renders: list = field(default_factory=list)
    model_loads: int = 0
    unloads: int = 0
    rescans: int = 0
    file_reads: int = 0
    saved_modules: dict = field(default_factory=dict)

    @property
    def modules(self) -> dict[str, types.ModuleType]:
        return {name: sys.modules[name] for name in _NAMES if name in sys.modules}

    @property
    def sd_model(self) -> Any:
        return sys.modules["modules.sd_models"].model_data.sd_model

    @property
    def state(self) -> State:
        return sys.modules["modules.shared"].state

    @property
    def networks(self) -> types.ModuleType:
        return sys.modules["networks"]

    @property
    def queue_lock(self) -> FIFOLock:
        return sys.modules["modules.call_queue"].queue_lock

    def generate(self, prompt: str, seed: int = 0, steps: int = 3, size: int = 32) -> torch.Tensor:
        """One txt2img as the user would make it (through the queue lock); the image in [0, 1]."""
        p = StableDiffusionProcessingTxt2Img(prompt=prompt, seed=seed, steps=steps, width=size, height=size, cfg_scale=4.0,
                                             do_not_save_samples=True, do_not_save_grid=True)  # fmt: skip
        with self.queue_lock:
            image = process_images(p).images[0]
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


_NAMES = (
    "modules", "modules.shared", "modules.call_queue", "modules.sd_models", "modules.prompt_parser",
    "modules.processing", "modules_forge", "modules_forge.forge_version", "modules_forge.main_thread",
    "backend", "backend.memory_management", "backend.operations", "backend.patcher", "backend.patcher.lora",
    "backend.patcher.base", "backend.diffusion_engine", "backend.diffusion_engine.sdxl", "backend.text_processing",
    "backend.text_processing.textual_inversion", "networks",
)  # fmt: skip


def _module(name: str, doc: str, package: bool = False, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    if package:
        mod.__path__ = []  # type: ignore[attr-defined]
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def install(lora_dir: Path, factory: Callable[[], Any] | None = None, **knobs: Any) -> World:
    """Put the stand-in into ``sys.modules``; ``factory()`` builds the engine on Forge's first model load."""
    global WORLD
    assert WORLD is None, "the Forge stand-in is installed already"
    w = World(Path(lora_dir), factory or build_engine, **knobs)
    w.saved_modules = {name: sys.modules.get(name) for name in _NAMES}
    WORLD = w
    cmd_opts = types.SimpleNamespace(lora_dir=str(lora_dir))
    shared = _module("modules.shared", "modules/shared.py", cmd_opts=cmd_opts, state=State(),
                     opts=types.SimpleNamespace(sdxl_crop_left=0, sdxl_crop_top=0))  # fmt: skip
    call_queue = _module("modules.call_queue", "modules/call_queue.py", queue_lock=FIFOLock())
    sd_models = _module("modules.sd_models", "modules/sd_models.py", model_data=SdModelData(),
                        forge_model_reload=forge_model_reload, FakeInitialModel=FakeInitialModel)  # fmt: skip
    prompt_parser = _module("modules.prompt_parser", "modules/prompt_parser.py", SdConditioning=SdConditioning)
    processing = _module("modules.processing", "modules/processing.py", process_images=process_images,
                         StableDiffusionProcessingTxt2Img=StableDiffusionProcessingTxt2Img, Processed=Processed)  # fmt: skip
    modules = _module("modules", "modules/", package=True, shared=shared, call_queue=call_queue, sd_models=sd_models,
                      prompt_parser=prompt_parser, processing=processing)  # fmt: skip
    forge_version = _module("modules_forge.forge_version", "modules_forge/forge_version.py", version="2.0.1v1.10.1")
    main_thread = _main_thread_module()
    modules_forge = _module("modules_forge", "modules_forge/", package=True, forge_version=forge_version, main_thread=main_thread)
    mm = _module("backend.memory_management", "backend/memory_management.py", current_loaded_models=w.current_loaded_models,
                 load_models_gpu=load_models_gpu, load_model_gpu=load_model_gpu, free_memory=free_memory,
                 unload_model_clones=unload_model_clones, LoadedModel=LoadedModel)  # fmt: skip
    operations = _module("backend.operations", "backend/operations.py",
                         ForgeOperations=types.SimpleNamespace(Linear=ForgeLinear), get_weight_and_bias=get_weight_and_bias)  # fmt: skip
    lora = _module("backend.patcher.lora", "backend/patcher/lora.py", LoraLoader=LoraLoader, merge_lora_to_weight=merge_lora_to_weight)
    base = _module("backend.patcher.base", "backend/patcher/base.py", ModelPatcher=ModelPatcher)
    patcher = _module("backend.patcher", "backend/patcher/", package=True, lora=lora, base=base)
    sdxl = _module("backend.diffusion_engine.sdxl", "backend/diffusion_engine/sdxl.py", StableDiffusionXL=StableDiffusionXL,
                   StableDiffusionXLRefiner=StableDiffusionXLRefiner)  # fmt: skip
    engine = _module("backend.diffusion_engine", "backend/diffusion_engine/", package=True, sdxl=sdxl)
    ti = _module("backend.text_processing.textual_inversion", "backend/text_processing/textual_inversion.py",
                 EmbeddingDatabase=ForgeEmbeddingDatabase, create_embedding_from_data=create_embedding_from_data)  # fmt: skip
    text_processing = _module("backend.text_processing", "backend/text_processing/", package=True, textual_inversion=ti)
    backend = _module("backend", "backend/", package=True, memory_management=mm, operations=operations, patcher=patcher,
                      diffusion_engine=engine, text_processing=text_processing)  # fmt: skip
    for mod in (modules, shared, call_queue, sd_models, prompt_parser, processing, modules_forge, forge_version,
                main_thread, backend, mm, operations, patcher, lora, base, engine, sdxl, text_processing, ti,
                _networks_module()):  # fmt: skip
        sys.modules[mod.__name__] = mod
    return w


def uninstall() -> None:
    """Take the stand-in out of ``sys.modules`` and put back whatever was there."""
    global WORLD
    if WORLD is None:
        return
    for name, previous in WORLD.saved_modules.items():
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
    WORLD = None
