"""A stand-in of exactly the AUTOMATIC1111 v1.10.1 surface ``ziplora/hosts/a1111/`` and ``scripts/ziplora.py``
use, built on the toy model.

``build_world(toy, lora_dir)`` wraps a ToyXL so it looks like ``shared.sd_model`` (an sgm ``DiffusionEngine`` as
A1111 extends it: ``.model.diffusion_model``, ``.conditioner.embedders`` with CLIP-L in HF layout and an
OpenCLIP-style bigG whose attention is a fused ``nn.MultiheadAttention``, ``get_learned_conditioning``,
``apply_model``, ``alphas_cumprod``, ``network_layer_mapping``...) and builds fake ``modules.*`` modules and a
fake ``networks`` (the built-in Lora extension) around it. ``installed(world)`` puts them into ``sys.modules``
(and patches the torch layer classes' forwards as the Lora extension does) and removes everything afterwards.

Every class and function says which A1111 (or sgm / open_clip) file and function it mirrors. Where the real
code does more than the adapter can observe, the stand-in does less and says so.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.a1111_apply import a1111_delta
from tests.standins.textual_inversion import (
    EXPECTED_SHAPE,
    A1111EmbeddingDatabase,
    Embedding,
    EmbeddingsWithFixes,
    create_embedding_from_data,
    splice_embeddings,
    word_ids,
)
from ziplora.architecture.sgm_unet import timestep_embedding
from ziplora.schedule import ddim_sample
from ziplora.toy.pipeline import LATENT_FACTOR, SIZE_EMBED_DIM, ToyXL

# ------------------------------------------------------------------------------------------------------------
# modules/fifo_lock.py, modules/shared_state.py, modules/options.py


class FIFOLock:
    """Mirrors modules/fifo_lock.py FIFOLock: a non-reentrant lock; ``acquire(blocking=False)`` never waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = True) -> bool:
        return self._lock.acquire(blocking)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        """Not in A1111 (tests ask through ``_lock.locked()`` there too)."""
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


class State:
    """Mirrors modules/shared_state.py State: the fields the progress API reads, begin / end / interrupt / nextjob."""

    def __init__(self) -> None:
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo: str | None = None
        self.time_start: float | None = None
        self.begun: list[str] = []  # not in A1111: which jobs began, for the tests

    def begin(self, job: str = "(unknown)") -> None:
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.skipped = self.interrupted = self.stopping_generation = False
        self.textinfo = None
        self.job = job
        self.begun.append(job)

    def end(self) -> None:
        self.job = ""
        self.job_count = 0

    def interrupt(self) -> None:
        self.interrupted = True

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0


class OptionInfo:
    """Mirrors modules/options.py OptionInfo (default, label, component, component_args, ... section)."""

    def __init__(self, default: Any = None, label: str = "", component: Any = None, component_args: Any = None, onchange: Any = None,
                 section: Any = None, refresh: Any = None, comment_before: str = "", comment_after: str = "", infotext: Any = None,
                 restrict_api: bool = False, category_id: Any = None) -> None:  # fmt: skip
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.section = section
        self.category_id = category_id
        self.restrict_api = restrict_api

    def info(self, info: str) -> OptionInfo:
        return self

    def needs_reload_ui(self) -> OptionInfo:
        return self


def options_section(section_identifier: tuple, options_dict: dict[str, OptionInfo]) -> dict[str, OptionInfo]:
    """Mirrors modules/options.py options_section: stamps the section on every OptionInfo."""
    for v in options_dict.values():
        v.section = section_identifier[0:2]
        if len(section_identifier) == 3:
            v.category_id = section_identifier[2]
    return options_dict


class Options:
    """Mirrors modules/options.py Options: saved values in ``data``, defaults from ``data_labels`` (the same dict
    object as ``shared.options_templates``), AttributeError for anything else."""

    def __init__(self, data_labels: dict[str, OptionInfo], data: dict[str, Any]) -> None:
        object.__setattr__(self, "data_labels", data_labels)
        object.__setattr__(self, "data", data)

    def __getattr__(self, item: str) -> Any:
        data, labels = object.__getattribute__(self, "data"), object.__getattribute__(self, "data_labels")
        if item in data:
            return data[item]
        if item in labels:
            return labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        self.data[key] = value
        return True


# ------------------------------------------------------------------------------------------------------------
# The SDXL model object (sgm DiffusionEngine as modules/sd_models.py and sd_models_xl.py extend it), on ToyXL


class OpenClipResidualAttentionBlock(nn.Module):
    """Mirrors open_clip/transformer.py ResidualAttentionBlock (2.20): a fused ``nn.MultiheadAttention``
    (sequence-first) called as ``attn(x, x, x, need_weights=False, attn_mask=mask)[0]``, and an MLP of
    ``c_fc`` / ``gelu`` / ``c_proj``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(width * 4, width))])
        )

    def forward(self, q_x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(q_x)
        mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        x = q_x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTextModel(nn.Module):
    """Mirrors the text half of open_clip/model.py CLIP (what sgm's FrozenOpenCLIPEmbedder2 keeps as ``.model``):
    token_embedding, positional_embedding, transformer.resblocks, ln_final, text_projection (a bare Parameter),
    and the causal ``attn_mask`` buffer. Built from the toy's second encoder, weight for weight."""

    def __init__(self, toy_te: nn.Module) -> None:
        super().__init__()
        cfg = toy_te.config
        tm = toy_te.text_model
        self.token_embedding = copy.deepcopy(tm.embeddings.token_embedding)
        self.positional_embedding = nn.Parameter(tm.embeddings.position_embedding.weight.detach().clone())
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList()
        for layer in tm.encoder.layers:
            block = OpenClipResidualAttentionBlock(cfg.width, cfg.heads)
            a = layer.self_attn
            with torch.no_grad():
                block.attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
                block.attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
                block.attn.out_proj.load_state_dict(a.out_proj.state_dict())
                block.ln_1.load_state_dict(layer.layer_norm1.state_dict())
                block.ln_2.load_state_dict(layer.layer_norm2.state_dict())
                block.mlp.c_fc.load_state_dict(layer.mlp.fc1.state_dict())
                block.mlp.c_proj.load_state_dict(layer.mlp.fc2.state_dict())
            self.transformer.resblocks.append(block)
        self.ln_final = copy.deepcopy(tm.final_layer_norm)
        self.text_projection = nn.Parameter(toy_te.text_projection.weight.detach().t().clone())
        length = cfg.max_length
        self.register_buffer("attn_mask", torch.full((length, length), float("-inf")).triu_(1), persistent=False)


class FrozenCLIPEmbedder(nn.Module):
    """Mirrors sgm/modules/encoders/modules.py FrozenCLIPEmbedder: ``.transformer`` is the HF CLIPTextModel
    (here the toy's, which has HF module names); SDXL uses its penultimate hidden states."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer


class FrozenOpenCLIPEmbedder2(nn.Module):
    """Mirrors sgm FrozenOpenCLIPEmbedder2 (encode_with_transformer / text_transformer_forward / pool): the
    sequence goes through the resblocks sequence-first with ``model.attn_mask``; penultimate states and the
    projected pooled output are returned."""

    def __init__(self, model: OpenClipTextModel) -> None:
        super().__init__()
        self.model = model

    def encode(self, tokens: torch.Tensor, eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding
        x = x.permute(1, 0, 2)
        blocks = m.transformer.resblocks
        penultimate = x
        for i, r in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x.permute(1, 0, 2)
            x = r(x, attn_mask=m.attn_mask)
        last = m.ln_final(x.permute(1, 0, 2))
        pooled = last[torch.arange(last.shape[0]), eos] @ m.text_projection
        return penultimate, pooled


class CustomWordsEmbedder(nn.Module):
    """Mirrors modules/sd_hijack_clip.py FrozenCLIPEmbedderForSDXLWithCustomWords and sd_hijack_open_clip.py
    FrozenOpenCLIPEmbedder2WithCustomWords: the conditioner's text embedders, holding sgm's embedder as
    ``.wrapped`` (networks.py names modules from ``embedder.wrapped.named_modules()``). The toy tokenizer
    stands in for A1111's prompt parsing; it reads ``<lora:...>`` tags as words, as A1111's would."""

    input_key = "txt"
    is_trainable = False

    def __init__(self, wrapped: nn.Module, tokenizer: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], pooled: bool) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.tokenizer = tokenizer
        self.pooled = pooled
        self.hijack: list[Any] = []  # sd_hijack.model_hijack, once build_world hijacked the model

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Mirrors sd_hijack_clip.py FrozenCLIPEmbedderWithCustomWords.tokenize: ids without special tokens."""
        return word_ids(texts)

    def forward(self, texts: list[str]) -> Any:
        words = [re.sub(r"[<>:]", " ", t) for t in texts]  # A1111 would not strip tags: they become words
        if self.hijack:  # tokenize_line: embeddings found by the database, their fixes left on model_hijack
            words, self.hijack[0].fixes = splice_embeddings(words, self.hijack[0].embedding_db)
        tokens, eos = self.tokenizer(words)
        device = next(self.parameters()).device
        tokens, eos = tokens.to(device), eos.to(device)
        if self.pooled:
            return self.wrapped.encode(tokens, eos)
        return self.wrapped.transformer(tokens, eos)[0]


class ConcatTimestepEmbedderND(nn.Module):
    """Mirrors sgm ConcatTimestepEmbedderND: each size number as a sinusoidal embedding, concatenated."""

    is_trainable = False

    def __init__(self, input_key: str, outdim: int) -> None:
        super().__init__()
        self.input_key = input_key
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, dims = x.shape
        emb = timestep_embedding(x.reshape(-1).float(), self.outdim)
        return emb.reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """Mirrors sgm GeneralConditioner.forward: each embedder on its input key, under ``torch.no_grad`` unless
    trainable (none is, in A1111); 3-D outputs concatenated into ``crossattn``, 2-D into ``vector``; the text
    embeddings zeroed for keys in ``force_zero_embeddings``."""

    def __init__(self, embedders: list[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Mirrors modules/sd_models_xl.py tokenize (added to GeneralConditioner): the first embedder's."""
        return next(e for e in self.embedders if hasattr(e, "tokenize")).tokenize(texts)

    def forward(self, batch: dict[str, Any], force_zero_embeddings: list[str] | None = None) -> dict[str, torch.Tensor]:
        force_zero_embeddings = force_zero_embeddings or []
        out: dict[str, list[torch.Tensor]] = {}
        for embedder in self.embedders:
            context = nullcontext if embedder.is_trainable else torch.no_grad
            with context():
                outputs = embedder(batch[embedder.input_key])
            if not isinstance(outputs, (tuple, list)):
                outputs = [outputs]
            for emb in outputs:
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                out.setdefault("crossattn" if emb.dim() == 3 else "vector", []).append(emb)
        return {k: torch.cat(v, dim=-1) for k, v in out.items()}


class OpenAIWrapper(nn.Module):
    """Mirrors sgm/modules/diffusionmodules/wrappers.py OpenAIWrapper.forward as A1111 hijacks it
    (modules/sd_hijack_unet.py apply_model): the cond dict's tensors are cast to ``devices.dtype_unet`` IN
    PLACE, x and t too, then ``diffusion_model(x, timesteps=t, context=c['crossattn'], y=c['vector'])``."""

    def __init__(self, diffusion_model: nn.Module, devices: types.ModuleType) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self._devices = [devices]

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self._devices[0].dtype_unet
        for k in list(c):
            c[k] = c[k].to(dtype)
        c["cast_by_hijack"] = torch.ones(())  # not in A1111: shows the caller's dict was written to
        return self.diffusion_model(x.to(dtype), timesteps=t.to(dtype), context=c["crossattn"], y=c["vector"])


class FirstStageModel(nn.Module):
    """Stands in for sgm AutoencoderKLInferenceWrapper with the toy's exact "VAE" (space-to-depth by 2)."""

    dtype = torch.float32


class DiffusionEngine(nn.Module):
    """Mirrors sgm/models/diffusion.py DiffusionEngine as modules/sd_models.py (set_model_type, load_model_weights)
    and sd_models_xl.py (extend_sdxl, get_learned_conditioning, apply_model) leave it for SDXL base."""

    def __init__(self, toy: ToyXL, devices: types.ModuleType, shared: types.ModuleType) -> None:
        super().__init__()
        self.model = OpenAIWrapper(toy.unet, devices)
        te2 = OpenClipTextModel(toy.te2)
        self.conditioner = GeneralConditioner([
            CustomWordsEmbedder(FrozenCLIPEmbedder(toy.te1), toy.tokenizer, pooled=False),
            CustomWordsEmbedder(FrozenOpenCLIPEmbedder2(te2), toy.tokenizer, pooled=True),
            ConcatTimestepEmbedderND("original_size_as_tuple", SIZE_EMBED_DIM),
            ConcatTimestepEmbedderND("crop_coords_top_left", SIZE_EMBED_DIM),
            ConcatTimestepEmbedderND("target_size_as_tuple", SIZE_EMBED_DIM),
        ])  # fmt: skip
        self.first_stage_model = FirstStageModel()
        self.is_sdxl, self.is_sd1, self.is_sd2, self.is_sd3, self.is_ssd, self.is_sdxl_inpaint = True, False, False, False, False, False
        self.parameterization = "eps"
        self.latent_channels = toy.latent_shape[0]
        self.alphas_cumprod = toy.schedule.alphas_cumprod.clone()
        self.alphas_cumprod_original = self.alphas_cumprod
        self.lowvram = False
        self.scale_factor = 1.0
        self._shared = [shared]
        self._devices = [devices]
        self.conditioning_batches: list[list[str]] = []  # not in A1111: every text list the conditioner saw
        # sgm freezes the text encoders (requires_grad False); A1111 never freezes the UNet (True)
        self.conditioner.requires_grad_(False)
        self.model.requires_grad_(True)

    @property
    def cond_stage_model(self) -> GeneralConditioner:
        """modules/sd_hijack.py hijack sets ``m.cond_stage_model = conditioner`` for SDXL (a property here, so the
        state dict names each weight once)."""
        return self.conditioner

    def get_learned_conditioning(self, batch: Any) -> dict[str, torch.Tensor]:
        """Mirrors modules/sd_models_xl.py get_learned_conditioning: size from the batch (default 1024), crop
        from opts, zeroed text for an all-empty negative prompt."""
        opts = self._shared[0].opts
        width = getattr(batch, "width", 1024) or 1024
        height = getattr(batch, "height", 1024) or 1024
        negative = getattr(batch, "is_negative_prompt", False)
        n = len(batch)
        self.conditioning_batches.append(list(batch))
        device = next(self.parameters()).device
        sdxl_conds = {
            "txt": batch,
            "original_size_as_tuple": torch.tensor([height, width], device=device).repeat(n, 1),
            "crop_coords_top_left": torch.tensor([opts.sdxl_crop_top, opts.sdxl_crop_left], device=device).repeat(n, 1),
            "target_size_as_tuple": torch.tensor([height, width], device=device).repeat(n, 1),
        }
        force_zero = negative and all(x == "" for x in batch)
        return self.conditioner(sdxl_conds, force_zero_embeddings=["txt"] if force_zero else [])

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mirrors modules/sd_models_xl.py apply_model (non-inpaint): ``self.model(x, t, cond)``."""
        return self.model(x, t, cond)

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """sgm decode_first_stage: a scaled latent -> an image in [-1, 1]."""
        return F.pixel_shuffle(z.float() / self.scale_factor, LATENT_FACTOR)

    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        """sgm encode_first_stage: an image in [-1, 1] -> a scaled latent."""
        return F.pixel_unshuffle(x.float(), LATENT_FACTOR) * self.scale_factor


# ------------------------------------------------------------------------------------------------------------
# extensions-builtin/Lora: networks.py key mapping and weight handling, network.py, network_lora.py

RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")  # networks.py re_x_proj
_RE_TE2_LAYER = re.compile(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")


def convert_diffusers_name_to_compvis(key: str) -> str:
    """Mirrors networks.py convert_diffusers_name_to_compvis for the names kohya SDXL files use. Of its rules
    only ``lora_te2_text_model_encoder_layers_N_...`` changes such a name (to OpenCLIP's
    ``1_model_transformer_resblocks_N_...``: ``self_attn`` -> ``attn``, ``mlp_fc1/2`` -> ``mlp_c_fc/c_proj``); its
    diffusers-UNet and SD1/SD2 rules never match sgm-named ``lora_unet_`` or ``lora_te1_`` keys and are left
    out (tests/test_a1111_real.py checks both claims against the real function)."""
    m = _RE_TE2_LAYER.match(key)
    if m is None:
        return key
    rest = m.group(2)
    if "mlp_fc1" in rest:
        rest = rest.replace("mlp_fc1", "mlp_c_fc")
    elif "mlp_fc2" in rest:
        rest = rest.replace("mlp_fc2", "mlp_c_proj")
    else:
        rest = rest.replace("self_attn", "attn")
    return f"1_model_transformer_resblocks_{m.group(1)}_{rest}"


def resolve_network_key(module_key: str, mapping: dict[str, Any]) -> tuple[str, Any] | None:
    """Mirrors the lookup order of networks.py load_network for one file module key (the tensor key split at
    its first dot): the converted name; else its ``(.*)_([qkv]_proj)$`` prefix (bigG's fused MHA, the key
    keeping its suffix); else ``lora_unet`` -> ``diffusion_model``; else ``lora_te1_text_model`` ->
    ``0_transformer_text_model`` (then the SD1 form). Returns (sd_key, module), or None where A1111 would drop
    the key silently. The OFT branches are left out (no OFT keys are written)."""
    key = convert_diffusers_name_to_compvis(module_key)
    sd_module = mapping.get(key)
    if sd_module is None:
        m = RE_X_PROJ.match(key)
        if m:
            sd_module = mapping.get(m.group(1))
    if sd_module is None and "lora_unet" in module_key:
        key = module_key.replace("lora_unet", "diffusion_model")
        sd_module = mapping.get(key)
    elif sd_module is None and "lora_te1_text_model" in module_key:
        key = module_key.replace("lora_te1_text_model", "0_transformer_text_model")
        sd_module = mapping.get(key)
        if sd_module is None:
            key = module_key.replace("lora_te1_text_model", "transformer_text_model")
            sd_module = mapping.get(key)
    return None if sd_module is None else (key, sd_module)


def network_names(model: nn.Module, embedders: list[nn.Module]) -> dict[str, nn.Module]:
    """Mirrors networks.py assign_network_names_to_compvis_modules for SDXL: ``f"{i}_{name}"`` for every module
    of each embedder's ``.wrapped`` (i = its index), then every module of ``sd_model.model``; dots -> ``_``."""
    mapping: dict[str, nn.Module] = {}
    for i, embedder in enumerate(embedders):
        if not hasattr(embedder, "wrapped"):
            continue
        for name, module in embedder.wrapped.named_modules():
            mapping[f"{i}_{name.replace('.', '_')}"] = module
    for name, module in model.named_modules():
        mapping[name.replace(".", "_")] = module
    return mapping


def sdxl_network_layer_names() -> set[str]:
    """A1111's network names of the Linear / conv / attention modules of real SDXL base: the UNet from our
    meta-device sgm UNet (``reference_shapes``), CLIP-L as HF ``CLIPTextModel`` under ``0_transformer_``, OpenCLIP
    bigG under ``1_model_`` (32 resblocks: a fused ``attn``, its ``attn_out_proj``, ``mlp_c_fc``, ``mlp_c_proj``)."""
    from ziplora.formats.families import Family, reference_shapes

    shapes = reference_shapes(Family.SDXL)
    assert shapes is not None
    names = {"diffusion_model_" + k.path.replace(".", "_") for k in shapes if k.component == "unet"}
    for i in range(12):
        base = f"0_transformer_text_model_encoder_layers_{i}"
        names |= {f"{base}_self_attn_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        names |= {f"{base}_mlp_fc1", f"{base}_mlp_fc2"}
    for i in range(32):
        base = f"1_model_transformer_resblocks_{i}"
        names |= {f"{base}_attn", f"{base}_attn_out_proj", f"{base}_mlp_c_fc", f"{base}_mlp_c_proj"}
    return names


class NetworkOnDisk:
    """Mirrors network.py NetworkOnDisk: name (the stem), filename, metadata, alias (``ss_output_name`` or name)."""

    def __init__(self, name: str, filename: str) -> None:
        from ziplora.formats.safetensors_io import SafetensorsFile

        self.name = name
        self.filename = filename
        self.metadata = dict(SafetensorsFile(Path(filename)).metadata)
        self.alias = self.metadata.get("ss_output_name", name)

    def read_hash(self) -> None:
        pass


@dataclass
class NetworkModuleLora:
    """Mirrors network_lora.py NetworkModuleLora with network.py NetworkModule.calc_scale / finalize_updown /
    multiplier: ``up @ down * alpha / dim * multiplier`` (te multiplier when ``'transformer' in sd_key[:20]``)."""

    network: Any
    sd_key: str
    network_key: str
    w: dict[str, torch.Tensor]

    def multiplier(self) -> float:
        return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier

    def calc_updown(self, orig_weight: torch.Tensor) -> tuple[torch.Tensor, None]:
        delta = a1111_delta(self.w, tuple(orig_weight.shape), self.multiplier())
        return delta.to(orig_weight.device, orig_weight.dtype), None


@dataclass
class Network:
    """Mirrors network.py Network."""

    name: str
    network_on_disk: NetworkOnDisk
    modules: dict[str, NetworkModuleLora] = field(default_factory=dict)
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    dyn_dim: Any = None
    mtime: float = 0.0
    bundle_embeddings: dict = field(default_factory=dict)


def _make_networks_module(shared: types.ModuleType, sd_hijack: types.ModuleType) -> types.ModuleType:
    """The built-in Lora extension's ``networks`` module (networks.py), as far as the adapter uses it."""
    mod = types.ModuleType("networks")
    mod.__doc__ = "stand-in of extensions-builtin/Lora/networks.py"
    mod.available_networks = {}
    mod.available_network_aliases = {}
    mod.forbidden_network_aliases = {}
    mod.loaded_networks = []
    mod.networks_in_memory = {}
    mod.refreshes = 0  # not in A1111: how often list_available_networks ran

    def list_available_networks() -> None:
        """Mirrors networks.py list_available_networks / process_network_files: every file below the Lora dir,
        keyed by stem; aliases from ``ss_output_name``."""
        mod.available_networks.clear()
        mod.available_network_aliases.clear()
        mod.forbidden_network_aliases.clear()
        mod.forbidden_network_aliases.update({"none": 1, "Addams": 1})
        mod.refreshes += 1
        os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
        for root, _, files in os.walk(shared.cmd_opts.lora_dir):
            for f in sorted(files):
                if os.path.splitext(f)[1] not in (".pt", ".ckpt", ".safetensors"):
                    continue
                name = os.path.splitext(f)[0]
                entry = NetworkOnDisk(name, os.path.join(root, f))
                mod.available_networks[name] = entry
                if entry.alias in mod.available_network_aliases:
                    mod.forbidden_network_aliases[entry.alias.lower()] = 1
                mod.available_network_aliases[name] = entry
                mod.available_network_aliases[entry.alias] = entry

    def load_network(name: str, network_on_disk: NetworkOnDisk) -> Network:
        """Mirrors networks.py load_network for LoRA files: keys split at the first dot, module keys resolved
        in A1111's order, unmatched keys dropped (A1111 only logs them at debug level)."""
        from safetensors.torch import load_file

        net = Network(name, network_on_disk, mtime=os.path.getmtime(network_on_disk.filename))
        mapping = shared.sd_model.network_layer_mapping
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        keys: dict[str, str] = {}
        bundle: dict[str, dict[str, Any]] = {}
        for tensor_key, weight in load_file(network_on_disk.filename).items():
            module_key, _, part = tensor_key.partition(".")
            if module_key == "bundle_emb":  # textual inversions bundled in the LoRA (then unmatched, as in A1111)
                emb_name, vec_name = part.split(".", 1)
                emb_dict = bundle.setdefault(emb_name, {})
                if vec_name.split(".")[0] == "string_to_param":
                    emb_dict["string_to_param"] = {vec_name.split(".", 1)[1]: weight}
                else:
                    emb_dict[vec_name] = weight
            found = resolve_network_key(module_key, mapping)
            if found is None:
                mod.unmatched.append(tensor_key)
                continue
            grouped.setdefault(found[0], {})[part] = weight
            keys[found[0]] = module_key
        for sd_key, w in grouped.items():
            net.modules[sd_key] = NetworkModuleLora(net, sd_key, keys[sd_key], w)
        for emb_name, data in bundle.items():
            embedding = create_embedding_from_data(data, emb_name, filename=network_on_disk.filename + "/" + emb_name)
            embedding.loaded = None  # type: ignore[attr-defined]
            net.bundle_embeddings[emb_name] = embedding
        return net

    mod.unmatched = []  # not in A1111: the keys load_network dropped

    def load_networks(names: list[str], te_multipliers: list[float] | None = None, unet_multipliers: list[float] | None = None,
                      dyn_dims: list[Any] | None = None) -> None:  # fmt: skip
        """Mirrors networks.py load_networks: the loaded list becomes exactly ``names`` (aliases or names),
        reusing loaded / in-memory networks unless the file changed; weights are applied lazily later. Bundled
        embeddings: the previous set's unregistered, the new set's registered (a name from the embeddings
        folder keeps the folder's; a width that does not fit is skipped)."""
        emb_db = sd_hijack.model_hijack.embedding_db
        already = {net.name: net for net in mod.loaded_networks if net.name in names}
        for net in mod.loaded_networks:  # the previous set's bundled embeddings are unregistered
            for emb_name, embedding in net.bundle_embeddings.items():
                if embedding.loaded:
                    emb_db.register_embedding_by_name(None, shared.sd_model, emb_name)
        mod.loaded_networks.clear()
        if any(mod.available_network_aliases.get(n) is None for n in names):
            list_available_networks()
        for i, name in enumerate(names):
            on_disk = (
                mod.available_networks.get(name)
                if name.lower() in mod.forbidden_network_aliases
                else mod.available_network_aliases.get(name)
            )
            if on_disk is None:
                continue
            net = already.get(name) or mod.networks_in_memory.get(name)
            if net is None or os.path.getmtime(on_disk.filename) > net.mtime:
                net = load_network(name, on_disk)
                mod.networks_in_memory[name] = net
            net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
            net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
            net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
            mod.loaded_networks.append(net)
            for emb_name, embedding in net.bundle_embeddings.items():  # registered unless the folder has that name
                if embedding.loaded is None and emb_name in emb_db.word_embeddings:
                    continue
                embedding.loaded = False
                if emb_db.expected_shape == -1 or emb_db.expected_shape == embedding.shape:
                    embedding.loaded = True
                    emb_db.register_embedding(embedding, shared.sd_model)
                else:
                    emb_db.skipped_embeddings[name] = embedding

    def store_weights_backup(weight: torch.Tensor | None) -> torch.Tensor | None:
        """Mirrors networks.py store_weights_backup: a CPU copy."""
        return None if weight is None else weight.to("cpu", copy=True)

    def restore_weights_backup(obj: nn.Module, name: str, weight: torch.Tensor | None) -> None:
        """Mirrors networks.py restore_weights_backup."""
        if weight is None:
            setattr(obj, name, None)
            return
        getattr(obj, name).copy_(weight)

    def network_restore_weights_from_backup(self: nn.Module) -> None:
        """Mirrors networks.py network_restore_weights_from_backup (MHA: in_proj_weight and out_proj)."""
        weights_backup = getattr(self, "network_weights_backup", None)
        bias_backup = getattr(self, "network_bias_backup", None)
        if weights_backup is None and bias_backup is None:
            return
        # no torch.no_grad() here, as in A1111: it runs inside forwards under processing's no_grad, and a
        # caller outside one gets "a leaf Variable that requires grad is being used in an in-place operation"
        if weights_backup is not None:
            if isinstance(self, nn.MultiheadAttention):
                restore_weights_backup(self, "in_proj_weight", weights_backup[0])
                restore_weights_backup(self.out_proj, "weight", weights_backup[1])
            else:
                restore_weights_backup(self, "weight", weights_backup)
        if isinstance(self, nn.MultiheadAttention):
            restore_weights_backup(self.out_proj, "bias", bias_backup)
        else:
            restore_weights_backup(self, "bias", bias_backup)

    def network_apply_weights(self: nn.Module) -> None:
        """Mirrors networks.py network_apply_weights: on a change of the loaded set, back the weights up (CPU),
        restore from the backup and add every loaded network's delta IN PLACE; an MHA takes a q/k/v/out set
        only when all four exist."""
        name = getattr(self, "network_layer_name", None)
        if name is None:
            return
        current = getattr(self, "network_current_names", ())
        wanted = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in mod.loaded_networks)
        is_mha = isinstance(self, nn.MultiheadAttention)
        if getattr(self, "network_weights_backup", None) is None and wanted != ():
            if current != ():
                raise RuntimeError(f"{name} - no backup weights found and current weights are not unchanged")
            self.network_weights_backup = (
                (store_weights_backup(self.in_proj_weight), store_weights_backup(self.out_proj.weight))
                if is_mha
                else store_weights_backup(self.weight)
            )
        if getattr(self, "network_bias_backup", None) is None and wanted != ():
            bias = self.out_proj.bias if is_mha else getattr(self, "bias", None)
            self.network_bias_backup = store_weights_backup(bias)
        if current == wanted:
            return
        network_restore_weights_from_backup(self)
        with torch.no_grad():
            for net in mod.loaded_networks:
                module = net.modules.get(name)
                if module is not None and hasattr(self, "weight") and not is_mha:
                    updown, _ = module.calc_updown(self.weight)
                    self.weight.copy_(self.weight + updown)
                    continue
                q, k, v, o = (net.modules.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
                if is_mha and q and k and v and o:
                    qw, kw, vw = self.in_proj_weight.chunk(3, 0)
                    self.in_proj_weight += torch.vstack([q.calc_updown(qw)[0], k.calc_updown(kw)[0], v.calc_updown(vw)[0]])
                    self.out_proj.weight += o.calc_updown(self.out_proj.weight)[0]
        self.network_current_names = wanted

    def network_reset_cached_weight(self: nn.Module) -> None:
        """Mirrors networks.py network_reset_cached_weight."""
        self.network_current_names = ()
        self.network_weights_backup = None
        self.network_bias_backup = None

    def assign_network_names_to_compvis_modules(sd_model: DiffusionEngine) -> None:
        """Mirrors networks.py assign_network_names_to_compvis_modules (SDXL branch)."""
        mapping = network_names(sd_model.model, list(sd_model.conditioner.embedders))
        for network_name, module in mapping.items():
            module.network_layer_name = network_name
        sd_model.network_layer_mapping = mapping

    for fn in (list_available_networks, load_network, load_networks, network_restore_weights_from_backup, network_apply_weights,
               network_reset_cached_weight, assign_network_names_to_compvis_modules):  # fmt: skip
        setattr(mod, fn.__name__, fn)
    return mod


class LoraPatches:
    """Mirrors extensions-builtin/Lora/lora_patches.py LoraPatches: class-wide forwards of Linear, Conv2d,
    GroupNorm, LayerNorm and MultiheadAttention that call ``networks.network_apply_weights(self)`` first
    (networks.py network_Linear_forward and siblings; the ``lora_functional`` path is left out)."""

    CLASSES = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)

    def __init__(self, networks: types.ModuleType) -> None:
        self.originals: dict[type, Callable] = {}
        for cls in self.CLASSES:
            original = cls.forward
            self.originals[cls] = original

            def forward(self_: nn.Module, *args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                networks.network_apply_weights(self_)
                return _original(self_, *args, **kwargs)

            cls.forward = forward  # type: ignore[method-assign]

    def undo(self) -> None:
        for cls, original in self.originals.items():
            cls.forward = original  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------------------------
# modules/processing.py, modules/sd_samplers_common.py, modules/sd_hijack.py, modules/script_callbacks.py ...


class Processed:
    """Mirrors modules/processing.py Processed: images (PIL), index_of_first_image, seeds."""

    def __init__(self, images: list[Any], all_seeds: list[int], index_of_first_image: int = 0) -> None:
        self.images = images
        self.all_seeds = all_seeds
        self.index_of_first_image = index_of_first_image


class StableDiffusionProcessingTxt2Img:
    """Mirrors modules/processing.py StableDiffusionProcessingTxt2Img's constructor (keyword fields) and close()."""

    def __init__(self, sd_model: Any = None, prompt: Any = "", negative_prompt: str = "", seed: Any = -1, sampler_name: str | None = None,
                 scheduler: str | None = None, steps: int = 50, cfg_scale: float = 7.0, width: int = 512, height: int = 512,
                 batch_size: int = 1, n_iter: int = 1, do_not_save_samples: bool = False, do_not_save_grid: bool = False,
                 override_settings: dict | None = None, **kwargs: Any) -> None:  # fmt: skip
        self.sd_model = sd_model
        self.prompt, self.negative_prompt, self.seed = prompt, negative_prompt, seed
        self.sampler_name, self.scheduler, self.steps, self.cfg_scale = sampler_name, scheduler, steps, cfg_scale
        self.width, self.height, self.batch_size, self.n_iter = width, height, batch_size, n_iter
        self.do_not_save_samples, self.do_not_save_grid = do_not_save_samples, do_not_save_grid
        self.override_settings = dict(override_settings or {})
        self.extra = kwargs
        self.closed = False

    def close(self) -> None:
        self.closed = True


_RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")  # modules/extra_networks.py re_extra_net


def _make_processing(world: A1111World) -> types.ModuleType:
    mod = types.ModuleType("modules.processing")
    mod.opt_C = 4  # processing.py opt_C
    mod.opt_f = LATENT_FACTOR  # processing.py opt_f is 8 for SDXL's VAE; the toy "VAE" downsamples by 2
    mod.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    mod.Processed = Processed
    mod.calls = []  # not in A1111: every processing object run

    def decode_latent_batch(model: Any, batch: torch.Tensor, target_device: Any = None, check_for_nans: bool = False) -> list[torch.Tensor]:
        """Mirrors processing.py decode_latent_batch: one image in [-1, 1] per latent (NaN fallback left out)."""
        out = []
        for i in range(batch.shape[0]):
            sample = model.decode_first_stage(batch[i : i + 1])[0]
            out.append(sample.to(target_device) if target_device is not None else sample)
        return out

    def process_images(p: StableDiffusionProcessingTxt2Img) -> Processed:
        """Mirrors modules/processing.py process_images / process_images_inner for txt2img, as far as the adapter
        can see: override_settings applied and restored; prompt tags parsed (extra_networks.parse_prompts: the
        first prompt's) and the Lora extension activated (extra_networks_lora.ExtraNetworkLora.activate ->
        networks.load_networks, which stays loaded afterwards); per-image seeds; shared.state job_count /
        sampling_step / nextjob updates; an interrupt stops sampling early but still returns images. The
        sampler is our DDIM instead of k-diffusion; samples are saved only in a list, never to disk."""
        shared, state = world.shared, world.shared.state
        mod.calls.append(p)
        stored = {k: shared.opts.data.get(k) for k in p.override_settings}
        for k, v in p.override_settings.items():
            shared.opts.set(k, v, is_api=True, run_callbacks=False)
        try:
            prompts = list(p.prompt) if isinstance(p.prompt, list) else [p.prompt] * (p.batch_size * p.n_iter)
            seeds = list(p.seed) if isinstance(p.seed, list) else [int(p.seed) + i for i in range(len(prompts))]
            if state.job_count == -1:
                state.job_count = p.n_iter
            names, mults = [], []
            for name, args in _RE_EXTRA_NET.findall(prompts[0]):
                if name in ("lora", "lyco"):
                    items = args.split(":")
                    names.append(items[0])
                    mults.append(float(items[1]) if len(items) > 1 else 1.0)
            sd_lora = shared.opts.sd_lora
            if sd_lora != "None" and sd_lora in world.networks.available_networks and sd_lora not in names:
                names.append(sd_lora)
                mults.append(1.0)
            world.networks.load_networks(names, mults, mults, None)
            texts = [_RE_EXTRA_NET.sub("", t) for t in prompts]
            model = p.sd_model
            cond = model.get_learned_conditioning(world.prompt_parser.SdConditioning(texts, width=p.width, height=p.height))
            uncond = model.get_learned_conditioning(
                world.prompt_parser.SdConditioning(
                    [p.negative_prompt] * len(texts), is_negative_prompt=True, width=p.width, height=p.height
                )
            )
            shape = (model.latent_channels, p.height // mod.opt_f, p.width // mod.opt_f)
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
            state.sampling_steps = p.steps
            last = [noise]

            class _Stop(Exception):
                pass

            def on_step(i: int, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> None:
                state.sampling_step = i
                last[0] = x
                if state.interrupted:
                    raise _Stop

            def predict(x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
                return model.apply_model(x, t, dict(c))

            try:
                with torch.no_grad():
                    latents = ddim_sample(predict, world.schedule(model), noise, cond, uncond, p.steps, p.cfg_scale, on_step=on_step)
            except _Stop:
                latents = last[0]
            with torch.no_grad():
                samples = decode_latent_batch(model, latents, "cpu")
            from PIL import Image

            images = [
                Image.fromarray((((s.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for s in samples
            ]
            if not p.do_not_save_samples:
                world.saved_images.extend(images)
            state.nextjob()
            return Processed(images, seeds)
        finally:
            for k, v in stored.items():
                if v is None:
                    shared.opts.data.pop(k, None)
                else:
                    shared.opts.data[k] = v

    mod.decode_latent_batch = decode_latent_batch
    mod.process_images = process_images
    return mod


class SdOptimization:
    """Mirrors modules/sd_hijack_optimizations.py SdOptimization (name, label, cmd_opt, priority, title())."""

    def __init__(self, name: str, label: str | None, priority: int) -> None:
        self.name, self.label, self.priority, self.cmd_opt = name, label, priority, None

    def title(self) -> str:
        return self.name if self.label is None else f"{self.name} - {self.label}"


def _make_sd_hijack(world: A1111World) -> types.ModuleType:
    mod = types.ModuleType("modules.sd_hijack")
    mod.optimizers = [SdOptimization("Doggettx", None, 90), SdOptimization("sdp-no-mem", "scaled dot product without memory efficient attention", 80),
                      SdOptimization("sdp", "scaled dot product", 70), SdOptimization("V1", "original v1", 10)]  # fmt: skip
    mod.current_optimizer = None
    mod.applied = []  # not in A1111: every selection, for the tests

    def apply_optimizations(option: str | None = None) -> str:
        """Mirrors modules/sd_hijack.py apply_optimizations: the option or opts.cross_attention_optimization;
        Automatic = the highest priority; a title picks that one; "None" disables. (The stand-in swaps no
        forward: the toy's attention is always SDPA.)"""
        selection = option or world.shared.opts.cross_attention_optimization
        if selection == "None":
            chosen = None
        elif selection == "Automatic":
            chosen = mod.optimizers[0]
        else:
            chosen = next((o for o in mod.optimizers if o.title() == selection), mod.optimizers[0])
        mod.current_optimizer = chosen
        mod.applied.append(selection)
        return "" if chosen is None else chosen.name

    class StableDiffusionModelHijack:
        """Mirrors sd_hijack.py StableDiffusionModelHijack.apply_optimizations."""

        optimization_method: str | None = None

        def apply_optimizations(self, option: str | None = None) -> None:
            self.optimization_method = apply_optimizations(option)

    mod.apply_optimizations = apply_optimizations
    mod.model_hijack = StableDiffusionModelHijack()
    mod.model_hijack.embedding_db = A1111EmbeddingDatabase()  # sd_hijack.py: the textual-inversion embeddings
    mod.model_hijack.embedding_db.expected_shape = EXPECTED_SHAPE  # as load_textual_inversion_embeddings sets it at load
    mod.model_hijack.fixes = None
    mod.EmbeddingsWithFixes = EmbeddingsWithFixes
    mod.model_hijack.apply_optimizations()
    return mod


def _make_script_callbacks() -> types.ModuleType:
    """Mirrors modules/script_callbacks.py: on_* registration, and the ui_tabs / app_started dispatchers."""
    mod = types.ModuleType("modules.script_callbacks")
    mod.callbacks = {"ui_tabs": [], "app_started": [], "model_loaded": [], "script_unloaded": [], "ui_settings": []}

    def register(kind: str) -> Callable:
        def on(callback: Callable, *, name: str | None = None) -> None:
            mod.callbacks[kind].append(callback)

        on.__name__ = f"on_{kind}"
        return on

    for kind in list(mod.callbacks):
        setattr(mod, f"on_{kind}", register(kind))

    def ui_tabs_callback() -> list:
        """Mirrors script_callbacks.ui_tabs_callback: every callback's list of (component, title, elem_id)."""
        res: list = []
        for cb in mod.callbacks["ui_tabs"]:
            res += cb() or []
        return res

    def app_started_callback(demo: Any, app: Any) -> None:
        """Mirrors script_callbacks.app_started_callback (demo is None with --nowebui)."""
        for cb in mod.callbacks["app_started"]:
            cb(demo, app)

    mod.ui_tabs_callback = ui_tabs_callback
    mod.app_started_callback = app_started_callback
    return mod


# ------------------------------------------------------------------------------------------------------------
# The world


class SdConditioning(list):
    """Mirrors modules/prompt_parser.py SdConditioning: a list of prompts with is_negative_prompt, width, height."""

    def __init__(self, prompts: list[str], is_negative_prompt: bool = False, width: int | None = None, height: int | None = None,
                 copy_from: Any = None) -> None:  # fmt: skip
        super().__init__()
        self.extend(prompts)
        copy_from = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


@dataclass
class A1111World:
    toy: ToyXL
    lora_dir: Path
    basedir: Path
    modules: dict[str, types.ModuleType] = field(default_factory=dict)
    saved_images: list[Any] = field(default_factory=list)
    patches: LoraPatches | None = None

    def __getattr__(self, name: str) -> Any:
        mods = self.__dict__.get("modules", {})
        for key in (f"modules.{name}", name):
            if key in mods:
                return mods[key]
        raise AttributeError(name)

    @property
    def sd_model(self) -> DiffusionEngine:
        return self.modules["modules.shared"].sd_model

    @staticmethod
    def schedule(model: DiffusionEngine):  # type: ignore[no-untyped-def]
        from ziplora.schedule import NoiseSchedule

        return NoiseSchedule(model.alphas_cumprod.float())


def build_world(toy: ToyXL, lora_dir: Path, basedir: Path | None = None) -> A1111World:
    """Fake ``modules.*`` and ``networks`` around a copy-free wrap of ``toy`` (the toy's modules become the model's)."""
    world = A1111World(toy, Path(lora_dir), Path(basedir or Path(__file__).resolve().parents[2]))
    package = types.ModuleType("modules")
    package.__path__ = []  # a package: ``from modules import shared`` finds its submodules in sys.modules

    devices = types.ModuleType("modules.devices")
    devices.__doc__ = "stand-in of modules/devices.py"
    devices.cpu = torch.device("cpu")
    devices.device = torch.device("cpu")
    devices.dtype = devices.dtype_unet = devices.dtype_vae = devices.dtype_inference = torch.float32
    devices.fp8 = False
    devices.unet_needs_upcast = False
    devices.gc_calls = 0  # not in A1111

    def torch_gc() -> None:
        devices.gc_calls += 1

    class NansException(Exception):
        pass

    devices.autocast = lambda disable=False: nullcontext()  # devices.autocast: a no-op with fp32 dtypes
    devices.without_autocast = lambda disable=False: nullcontext()
    devices.torch_gc = torch_gc
    devices.NansException = NansException

    shared = types.ModuleType("modules.shared")
    shared.__doc__ = "stand-in of modules/shared.py (opts, cmd_opts, state, sd_model, options_templates)"
    shared.options_templates = {}
    shared.options_section = options_section
    shared.OptionInfo = OptionInfo
    shared.opts = Options(shared.options_templates, {
        "cross_attention_optimization": "Automatic", "lora_functional": False, "sd_lora": "None",
        "sdxl_crop_top": 0, "sdxl_crop_left": 0,
        "ziplora_resolution": 32, "ziplora_preview_steps": 4, "ziplora_guidance": 4.0,
    })  # fmt: skip
    shared.cmd_opts = types.SimpleNamespace(
        lora_dir=str(world.lora_dir), lyco_dir_backcompat=str(world.lora_dir.parent / "LyCORIS"), lowvram=False, medvram=False,
        medvram_sdxl=False, api_auth=None, disable_opt_split_attention=False, no_half=True,
    )  # fmt: skip
    shared.state = State()
    shared.loaded_hypernetworks = []  # shared.py loaded_hypernetworks: what every cross-attention applies

    call_queue = types.ModuleType("modules.call_queue")
    call_queue.__doc__ = "stand-in of modules/call_queue.py"
    call_queue.queue_lock = FIFOLock()

    prompt_parser = types.ModuleType("modules.prompt_parser")
    prompt_parser.SdConditioning = SdConditioning

    sd_unet = types.ModuleType("modules.sd_unet")
    sd_unet.__doc__ = "stand-in of modules/sd_unet.py"
    sd_unet.current_unet = None
    sd_unet.current_unet_option = None

    sd_samplers_common = types.ModuleType("modules.sd_samplers_common")

    def images_tensor_to_samples(image: torch.Tensor, approximation: Any = None, model: Any = None) -> torch.Tensor:
        """Mirrors modules/sd_samplers_common.py images_tensor_to_samples: images in [0, 1] -> scaled latents."""
        model = model or shared.sd_model
        return model.encode_first_stage(image.to(devices.device, devices.dtype_vae) * 2 - 1)

    sd_samplers_common.images_tensor_to_samples = images_tensor_to_samples

    scripts = types.ModuleType("modules.scripts")
    scripts.basedir = lambda: str(world.basedir)  # modules/scripts.py basedir: the extension's folder during import

    sd_models = types.ModuleType("modules.sd_models")
    sd_models.__doc__ = "stand-in of modules/sd_models.py (model_data only)"

    class SdModelData:
        """Mirrors sd_models.SdModelData: ``sd_model`` is the loaded model or None; reading it loads nothing."""

        @property
        def sd_model(self) -> Any:
            return getattr(shared, "sd_model", None)

    sd_models.model_data = SdModelData()

    for name, mod in (("devices", devices), ("shared", shared), ("call_queue", call_queue), ("prompt_parser", prompt_parser),
                      ("sd_unet", sd_unet), ("sd_samplers_common", sd_samplers_common), ("scripts", scripts),
                      ("sd_models", sd_models), ("script_callbacks", _make_script_callbacks())):  # fmt: skip
        world.modules[f"modules.{name}"] = mod
        setattr(package, name, mod)
    world.modules["modules"] = package

    shared.sd_model = DiffusionEngine(toy, devices, shared)
    for name, mod in (("processing", _make_processing(world)), ("sd_hijack", _make_sd_hijack(world))):
        world.modules[f"modules.{name}"] = mod
        setattr(package, name, mod)
    _hijack_embeddings(shared.sd_model, world.modules["modules.sd_hijack"].model_hijack)
    textual_inversion = types.ModuleType("modules.textual_inversion.textual_inversion")
    textual_inversion.__doc__ = "stand-in of modules/textual_inversion/textual_inversion.py"
    textual_inversion.Embedding, textual_inversion.EmbeddingDatabase = Embedding, A1111EmbeddingDatabase
    textual_inversion.create_embedding_from_data = create_embedding_from_data
    ti_package = types.ModuleType("modules.textual_inversion")
    ti_package.__path__ = []  # type: ignore[attr-defined]
    ti_package.textual_inversion = textual_inversion  # type: ignore[attr-defined]
    world.modules["modules.textual_inversion"] = package.textual_inversion = ti_package  # type: ignore[attr-defined]
    world.modules["modules.textual_inversion.textual_inversion"] = textual_inversion
    networks = _make_networks_module(shared, world.modules["modules.sd_hijack"])
    world.modules["networks"] = networks
    networks.assign_network_names_to_compvis_modules(shared.sd_model)
    networks.list_available_networks()
    return world


def _hijack_embeddings(sd_model: DiffusionEngine, hijack: Any) -> None:
    """Mirrors modules/sd_hijack.py StableDiffusionModelHijack.hijack for SDXL's text embedders: the token
    embeddings wrapped in EmbeddingsWithFixes (key ``clip_l`` for CLIP-L, ``clip_g`` for bigG), the custom-words
    embedders pointed at the hijack (its embedding database and fixes)."""
    first, second = sd_model.conditioner.embedders[0], sd_model.conditioner.embedders[1]
    clip_l = first.wrapped.transformer.text_model.embeddings
    clip_l.token_embedding = EmbeddingsWithFixes(clip_l.token_embedding, hijack, "clip_l")
    big_g = second.wrapped.model
    big_g.token_embedding = EmbeddingsWithFixes(big_g.token_embedding, hijack, "clip_g")
    first.hijack.append(hijack)
    second.hijack.append(hijack)


@contextmanager
def installed(world: A1111World) -> Iterator[A1111World]:
    """The stand-in modules in ``sys.modules`` and the Lora extension's forward patches on, for one test."""
    saved = {name: sys.modules.get(name) for name in world.modules}
    sys.modules.update(world.modules)
    world.patches = LoraPatches(world.modules["networks"])
    try:
        yield world
    finally:
        world.patches.undo()
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
