"""The Forge 2 host: ZipLoRA on the model Stable Diffusion WebUI Forge (``lllyasviel``, branch main) has loaded.

What differs from AUTOMATIC1111, and why this module exists (details and sources in docs/forge.md):

- Forge applies LoRAs by baking them into new weight Parameters (or, on low-bit models, merging them on the fly
  under inference mode). The job therefore loads the LoRA-free patchers (``forge_objects_original``) through
  Forge's own ``memory_management.load_models_gpu``, which restores the original weights; the user's next
  generation loads their LoRA patcher again and Forge re-applies the LoRAs itself.
- Forge builds its models under ``torch.inference_mode()``: the UNet's weights are inference tensors that
  autograd refuses. They are replaced, in place and value for value, by ordinary clones.
- Forge's transformer blocks add residuals in place (``x += n``), which corrupts what LayerNorm saved for
  backward: the inputs of ``norm1`` / ``norm2`` are cloned by pre-hooks while gradients are on.
- Forge's Linear is not a ``torch.nn.Linear``, and NF4 / GGUF / fp8 layers have no weight one can add to: the
  core finds layers by what they are, and this session tells it which layers must take the side path.

Every Forge import happens inside a function, so importing this module never needs Forge.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ziplora.errors import HostError, JobInterrupted, ZipLoraError
from ziplora.formats.families import Family
from ziplora.formats.keys import LayerKey
from ziplora.hosts.base import SessionOptions, export_defaults_for, iter_blocks, list_lora_files, resolve_in_roots
from ziplora.merge.patch import can_fuse
from ziplora.progress import Progress
from ziplora.schedule import Cond, NoiseSchedule

log = logging.getLogger(__name__)

__all__ = ["ForgeHost", "ForgeSession", "forge_version"]

_SUPPORTED = "Forge 2 (lllyasviel/stable-diffusion-webui-forge, branch main)"
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PRECISION_FLAGS = {"fp32": "--all-in-fp32", "fp16": "--all-in-fp16", "bf16": "--unet-in-bf16"}
_PREDICTIONS = ("epsilon", "v_prediction")


# ---------------------------------------------------------------------------------------------------------
# Finding Forge and its model


def forge_version() -> str:
    """``modules_forge.forge_version.version`` ("2.0.1v1.10.1" on main), or "unknown"."""
    try:
        return str(importlib.import_module("modules_forge.forge_version").version)
    except Exception:  # noqa: BLE001 - only used in messages
        return "unknown"


def _unsupported(what: str) -> HostError:
    return HostError(
        f"{what} (Forge version {forge_version()}): ZipLoRA supports {_SUPPORTED}; "
        "old Forge (ldm_patched) and forks (reForge, Forge Classic/Neo) are not supported"
    )


def _memory_management() -> Any:
    """``backend.memory_management``, after checking the Forge 2 pieces the job relies on are there."""
    try:
        mm = importlib.import_module("backend.memory_management")
        importlib.import_module("backend.patcher.lora")
    except ImportError as err:
        raise _unsupported(f"this WebUI has no {getattr(err, 'name', None) or 'backend.patcher.lora'}") from None
    for name in ("load_models_gpu", "current_loaded_models"):
        if not hasattr(mm, name):
            raise _unsupported(f"backend.memory_management has no {name}")
    return mm


def _current_model() -> Any:
    """The WebUI's model object without loading one (None, or Forge's lazy ``FakeInitialModel``)."""
    sd_models = sys.modules.get("modules.sd_models")
    data = getattr(sd_models, "model_data", None)
    return getattr(data, "sd_model", None)


def _load_model() -> Any:
    """``forge_model_reload()``: loads the checkpoint if Forge has not yet (it is lazy until the first
    generation) or if the user picked another one since."""
    from modules import sd_models

    reload = getattr(sd_models, "forge_model_reload", None)
    if reload is None:
        raise _unsupported("modules.sd_models has no forge_model_reload")
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


def _check_engine(sd_model: Any) -> None:
    """SDXL base with both text encoders, on Forge 2's engine objects; one HostError line otherwise."""
    if sd_model is None or type(sd_model).__name__ == "FakeInitialModel":
        raise HostError("Forge has no checkpoint loaded; pick an SDXL checkpoint at the top of the page")
    if getattr(sd_model, "forge_objects_original", None) is None:
        raise _unsupported("the loaded model has no forge_objects_original")
    clip = getattr(sd_model.forge_objects_original, "clip", None)
    encoders = getattr(clip, "cond_stage_model", None)
    has = {name: _child(encoders, name) is not None for name in ("clip_l", "clip_g")}
    if type(sd_model).__name__ == "StableDiffusionXLRefiner" or (getattr(sd_model, "is_sdxl", False) and not has["clip_l"]):
        raise HostError("the loaded checkpoint is the SDXL refiner; ZipLoRA merges LoRAs made for SDXL base models: load one")
    if not getattr(sd_model, "is_sdxl", False) or not all(has.values()):
        raise HostError(f"the loaded checkpoint is {_engine_kind(sd_model)}, not SDXL; load an SDXL checkpoint to merge SDXL LoRAs")
    unet = getattr(sd_model.forge_objects_original, "unet", None)
    if getattr(getattr(unet, "model", None), "diffusion_model", None) is None:
        raise _unsupported("the UNet patcher has no model.diffusion_model")
    prediction = getattr(getattr(unet.model, "predictor", None), "prediction_type", None)
    if prediction not in _PREDICTIONS:
        raise HostError(f"this checkpoint predicts {prediction!r}; ZipLoRA handles epsilon and v-prediction SDXL models")


def _child(container: Any, name: str) -> Any:
    """A text encoder of Forge's ``JointTextEncoder`` (an ``nn.Module`` holding them as attributes)."""
    return None if container is None else getattr(container, name, None)


def _networks() -> Any:
    """Forge's built-in LoRA module (``extensions-builtin/sd_forge_lora/networks.py``), or None if not loaded."""
    module = sys.modules.get("networks")
    if module is None:
        try:
            module = importlib.import_module("networks")
        except ImportError:
            return None
    return module if hasattr(module, "list_available_networks") else None


# ---------------------------------------------------------------------------------------------------------
# Making Forge's UNet usable for autograd, and undoing it


def _quantised_kind(module: nn.Module) -> str | None:
    """'NF4/FP4 (bitsandbytes)' or 'GGUF' for Forge's low-bit Linears (by their weight), else None."""
    weight = getattr(module, "weight", None)
    if getattr(weight, "quant_state", None) is not None or getattr(weight, "bnb_quantized", False):
        return "NF4/FP4 (bitsandbytes)"
    if getattr(weight, "gguf_cls", None) is not None:
        return "GGUF"
    return None


def _quantised_param(p: torch.Tensor) -> bool:
    return getattr(p, "quant_state", None) is not None or getattr(p, "bnb_quantized", False) or getattr(p, "gguf_cls", None) is not None


def _logical_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a low-bit Linear: bitsandbytes keeps it in ``quant_state.shape``, GGUF in ``weight.shape``."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    shape = getattr(state, "shape", None) if state is not None else getattr(weight, "shape", None)
    if shape is None or len(shape) != 2:
        return None
    return int(shape[0]), int(shape[1])


@torch.no_grad()
def _deinference(root: nn.Module) -> int:
    """Replace every inference-tensor parameter / buffer by an ordinary clone: same module, name, value,
    device and dtype. Forge builds its models under inference mode, and autograd refuses to save such
    tensors. Quantised (NF4 / GGUF) weights stay: their layers dequantise into fresh tensors anyway.
    Returns how many tensors were replaced; the old ones are freed unless something else holds them."""
    replaced: dict[int, nn.Parameter] = {}
    count = 0
    with torch.inference_mode(False):
        for module in root.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.is_inference() or _quantised_param(p):
                    continue
                new = replaced.get(id(p))
                if new is None:
                    copy = getattr(p, "copy_with_data", None)  # GGUF's unquantised tensors keep their class
                    new = copy(p.data.clone()) if callable(copy) else nn.Parameter(p.data.clone(), requires_grad=False)
                    new.requires_grad_(False)
                    for attr, value in getattr(p, "__dict__", {}).items():
                        if attr not in getattr(new, "__dict__", {}):
                            setattr(new, attr, value)
                    replaced[id(p)] = new
                    count += 1
                module._parameters[name] = new
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_inference():
                    module._buffers[name] = b.clone()
                    count += 1
    return count


def _transformer_blocks(root: nn.Module) -> list[nn.Module]:
    """Forge's BasicTransformerBlocks (``backend/nn/unet.py``), by what they hold rather than their class."""
    return [
        m for m in root.modules()
        if all(isinstance(getattr(m, a, None), nn.Module) for a in ("norm1", "norm2", "attn1", "attn2"))
    ]  # fmt: skip


def _clone_first_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # BasicTransformerBlock._forward does `x += n` after attn1 and attn2, overwriting the tensor norm1 /
    # norm2 saved for backward; a copy keeps the saved one intact. Only while gradients are recorded.
    if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(), *args[1:])
    return None


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
            "te1": _child(encoders, "clip_l").transformer,
            "te2": _child(encoders, "clip_g").transformer,
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
            and _quantised_kind(module) is None
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
        return {k: _own(v).to(self.device) for k, v in cond.items()}

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
        _refuse_cpu_swap(self._mm, self._unet_patcher)

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
        return _own(latents)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor from one Forge made under inference mode."""
    with torch.inference_mode(False):
        return t.detach().clone()


def _loaded_entry(mm: Any, patcher: Any) -> Any:
    return next((entry for entry in mm.current_loaded_models if entry.model is patcher), None)


def _refuse_cpu_swap(mm: Any, unet_patcher: Any) -> None:
    entry = _loaded_entry(mm, unet_patcher)
    if entry is not None and getattr(entry, "model_accelerated", False):
        raise HostError(
            "Forge could fit only part of the UNet on the GPU and swaps the rest from CPU memory; training through "
            "swapped layers keeps a GPU copy of each alive until backward and runs out of memory: raise 'GPU Weights', "
            "close other GPU programs or drop --always-low-vram / --always-no-vram, then merge again"
        )


def _check_lora_free(patchers: list[Any], roots: list[nn.Module]) -> None:
    for patcher in patchers:
        loader = getattr(patcher, "lora_loader", None)
        if loader is not None and (getattr(loader, "loaded_hash", str([])) != str([]) or getattr(loader, "backup", None)):
            raise HostError("Forge did not take the user's LoRAs off the model; generate once without LoRAs, then merge again")
    for root in roots:
        if any(getattr(m, "forge_online_loras", None) for m in root.modules()):
            raise HostError("an on-the-fly LoRA is still attached to the model; generate once without LoRAs, then merge again")


def _compute_dtype(kmodel: Any, precision: str) -> torch.dtype:
    dtype = kmodel.computation_dtype
    wanted = _PRECISIONS.get(precision)
    if wanted is not None and wanted != dtype:
        name = str(dtype).replace("torch.", "")
        raise HostError(
            f"Forge computes this UNet in {name}, so precision {precision} is not available here; start Forge with "
            f"{_PRECISION_FLAGS[precision]} for it, or merge with precision auto"
        )
    return dtype  # type: ignore[no-any-return]


def _training_memory(unet_patcher: Any, resolution: int, latent: tuple[int, int], checkpointing: bool) -> int:
    """What to ask Forge to keep free: its own inference estimate for a batch of two, times what backward adds
    (activations kept until backward; far fewer with checkpointing). It only makes Forge unload other models."""
    channels, ratio = latent
    shape = [2, channels, resolution // ratio, resolution // ratio]
    try:
        inference = float(unet_patcher.memory_required(shape))
    except Exception:  # noqa: BLE001 - an estimate; Forge without it still works
        return 0
    return int(inference * (2 if checkpointing else 8))


def _expose_shapes(root: nn.Module) -> list[nn.Module]:
    """Give Forge's low-bit Linears (which know no in/out_features) their shape for the job; returns those
    changed, so the attributes can be removed afterwards."""
    changed = []
    for module in root.modules():
        if _quantised_kind(module) is None or hasattr(module, "in_features"):
            continue
        shape = _logical_shape(module)
        if shape is None:
            continue
        module.out_features, module.in_features = shape
        changed.append(module)
    return changed


def _recompute_casts(root: nn.Module) -> list[nn.Module]:
    """Layers that cast their stored weight to the input's dtype at every forward (``parameters_manual_cast``:
    fp8 storage, ``--unet-in-fp16`` computing in fp32 on a CPU, a partial load) hand ``F.linear`` / the conv a
    fresh copy, which autograd keeps until backward: the whole UNet again in the computation dtype (~10 GiB
    for SDXL in fp32; seen on a real Forge). While the job runs, such a layer's forward is recomputed in
    backward instead (``torch.utils.checkpoint``): only its input is kept. Quantised layers are left alone
    (their dequantised copies are the same story, but their backward is probed separately)."""
    from torch.utils.checkpoint import checkpoint

    changed: list[nn.Module] = []
    for module in root.modules():
        if not getattr(module, "parameters_manual_cast", False) or _quantised_kind(module) is not None:
            continue
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or "forward" in module.__dict__:
            continue
        original = module.forward

        def forward(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        module.forward = forward  # an instance attribute: the class's forward comes back when it is deleted
        changed.append(module)
    return changed


def _restore_forwards(modules: list[nn.Module]) -> None:
    for module in modules:
        module.__dict__.pop("forward", None)


def _probe_backward(root: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Say up front, not after minutes of sampling, when gradients cannot flow through a low-bit layer class."""
    seen: set[type] = set()
    for module in root.modules():
        kind = _quantised_kind(module)
        if kind is None or type(module) in seen:
            continue
        seen.add(type(module))
        shape = _logical_shape(module)
        if shape is None:
            continue
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = torch.randn(2, shape[1], device=device, dtype=dtype, requires_grad=True)
                module(x).float().square().mean().backward()
            ok = x.grad is not None and bool(torch.isfinite(x.grad).all())
            why = "no gradient came back"
        except Exception as err:  # noqa: BLE001 - reported as the reason
            ok, why = False, f"{type(err).__name__}: {' '.join(str(err).split())}"[:200]
        if not ok:
            raise HostError(
                f"gradients cannot flow through this checkpoint's {kind} layers here ({why}); "
                "load an fp16, bf16 or fp8 version of the checkpoint to merge"
            )


# ---------------------------------------------------------------------------------------------------------
# The host


class ForgeHost:
    """LoRAs live in Forge's ``--lora-dir``; the model is whatever SDXL checkpoint Forge has loaded.

    ``families``, ``default_resolution`` and the preview settings are parameters so the tests can drive this
    adapter on the toy model through a stand-in of Forge; the WebUI uses the defaults.
    """

    name = "forge"

    def __init__(
        self,
        families: tuple[Family, ...] = (Family.SDXL,),
        default_resolution: int = 1024,
        default_guidance: float = 5.0,
        preview_steps: int = 20,
        preview_sampler: str = "Euler",
    ) -> None:
        self.families = tuple(families)
        self.export_defaults = export_defaults_for(self.families[0])
        self.default_resolution = default_resolution
        self.default_guidance = default_guidance
        self.preview_steps = preview_steps
        self.preview_sampler = preview_sampler
        self._state_lock = threading.Lock()
        self._owner: int | None = None  # the thread holding Forge's queue lock through job()
        self._depth = 0

    # -- files ------------------------------------------------------------------------------------------
    def lora_dir(self) -> Path:
        from modules import shared

        return Path(shared.cmd_opts.lora_dir)

    def list_loras(self) -> list[Path]:
        return list_lora_files(self.lora_dir())

    def lora_hash(self, path: Path) -> str:
        """What Forge writes into infotexts: ``modules/hashes.py`` ``sha256`` hashes the whole file (unlike
        A1111, whose LoRA hash skips the header), and ``network.NetworkOnDisk.set_hash`` keeps 12 characters."""
        import hashlib

        digest = hashlib.sha256()
        with Path(path).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def after_write(self, path: Path) -> None:
        """Rescan Forge's LoRA list; drop its cached tensors and its "LoRAs already applied" markers when they
        may be of this file, so a rewritten file of the same name really loads anew. Three caches: the file's
        tensors (``networks.load_lora_state_dict``, an lru_cache by path), the [file, weights] list the model
        was patched for (``sd_model.current_lora_hash``) and, per torch model, the patch list its weights hold
        (``LoraLoader.loaded_hash``: a rebuilt patcher with the same file and weights is not re-merged)."""
        networks = _networks()
        if networks is None:
            return
        clear = getattr(getattr(networks, "load_lora_state_dict", None), "cache_clear", None)
        if callable(clear):
            clear()
        in_memory = getattr(networks, "networks_in_memory", None)
        if isinstance(in_memory, dict):
            in_memory.pop(path.stem, None)
        try:
            networks.list_available_networks()
        except Exception as err:  # noqa: BLE001 - the file is written; only the list is stale
            log.warning("ZipLoRA: Forge could not rescan its LoRA folder: %s", err)
        sd_model = _current_model()
        marker = getattr(sd_model, "current_lora_hash", None)
        if isinstance(marker, str) and path.name in marker:
            sd_model.current_lora_hash = None  # never equal to a real list: the next generation re-applies
        original = getattr(sd_model, "forge_objects_original", None)
        for patcher in (getattr(original, "unet", None), getattr(getattr(original, "clip", None), "patcher", None)):
            loader = getattr(patcher, "lora_loader", None)
            applied = getattr(loader, "loaded_hash", None)
            if isinstance(applied, str) and path.name in applied:
                loader.loaded_hash = None  # the next load restores the originals and merges the new tensors

    # -- the queue --------------------------------------------------------------------------------------
    def _holds_job(self) -> bool:
        with self._state_lock:
            return self._owner == threading.get_ident()

    @contextmanager
    def job(self, progress: Progress) -> Iterator[None]:
        """Forge's queue lock (what every generation takes: ``wrap_gradio_gpu_call`` in the UI and the API
        routes), ``shared.state.begin()/end()``, our progress mirrored into ``shared.state`` and its Interrupt
        button read as ours. Re-entered by the same thread (session or render inside a job) it does nothing."""
        if self._holds_job():
            with self._state_lock:
                self._depth += 1
            try:
                yield
            finally:
                with self._state_lock:
                    self._depth -= 1
            return
        from modules import call_queue, shared

        lock = call_queue.queue_lock
        if not lock.acquire(blocking=False):
            progress.begin_stage("Waiting for the WebUI to finish its current generation", 0)
            lock.acquire()
        with self._state_lock:
            self._owner, self._depth = threading.get_ident(), 1
        try:
            state = shared.state
            state.begin(job="ziplora")
            remove_listener = progress.add_listener(lambda p: _mirror(state, p))
            remove_source = progress.add_interrupt_source(lambda: bool(getattr(state, "interrupted", False)))
            try:
                yield
            finally:
                remove_source()
                remove_listener()
                try:
                    state.end()
                finally:
                    # as modules/call_queue.py wrap_gradio_call does after every job
                    state.skipped = state.interrupted = state.stopping_generation = False
                    state.job_count = 0
                    state.job = ""
        finally:
            with self._state_lock:
                self._owner, self._depth = None, 0
            lock.release()

    # -- the model --------------------------------------------------------------------------------------
    @contextmanager
    def session(self, options: SessionOptions, progress: Progress) -> Iterator[ForgeSession]:
        with ExitStack() as stack:
            stack.enter_context(self.job(progress))
            mm = _memory_management()
            progress.begin_stage("Loading the model", 0)
            sd_model = _load_model()
            _check_engine(sd_model)
            if progress.interrupted():
                raise JobInterrupted("interrupted before the merge started; nothing was written")
            original = sd_model.forge_objects_original
            unet, clip = original.unet, original.clip
            kmodel = unet.model
            dtype = _compute_dtype(kmodel, options.precision)
            vae = getattr(sd_model.forge_objects, "vae", None)
            latent = (int(getattr(vae, "latent_channels", 4)), int(getattr(vae, "downscale_ratio", 8)))
            resolution = options.resolution or self.default_resolution
            memory = _training_memory(unet, resolution, latent, options.gradient_checkpointing)

            # 1. Forge's current objects (perhaps the user's LoRA clones) -> the LoRA-free originals for the job,
            #    so Forge's own calls (prompt encoding, VAE) use them too; put back as they were afterwards.
            current = sd_model.forge_objects
            sd_model.forge_objects = original.shallow_copy()
            stack.callback(setattr, sd_model, "forge_objects", current)
            # 2. Load the LoRA-free patchers the Forge way: LoraLoader.refresh restores the original weights
            #    (and drops on-the-fly LoRAs); the registry stays right for the next generation.
            mm.load_models_gpu([unet, clip.patcher], memory_required=memory)
            _refuse_cpu_swap(mm, unet)
            dm = kmodel.diffusion_model
            _check_lora_free([unet, clip.patcher], [dm, clip.cond_stage_model])
            # 3. Autograd through Forge's UNet: ordinary tensors, frozen (flags back afterwards), norm inputs copied.
            flags = {name: p.requires_grad for name, p in dm.named_parameters()}
            stack.callback(_restore_flags, dm, flags)
            replaced = _deinference(dm)
            log.info("ZipLoRA: %d inference tensors of Forge's UNet replaced by ordinary copies", replaced)
            dm.requires_grad_(False)
            for block in _transformer_blocks(dm):
                for norm in (block.norm1, block.norm2):
                    stack.callback(norm.register_forward_pre_hook(_clone_first_input).remove)
            for module in _expose_shapes(dm):
                stack.callback(_forget_shape, module)
            recast = _recompute_casts(dm)
            stack.callback(_restore_forwards, recast)
            if recast:
                log.info("ZipLoRA: %d layers cast their weights at each forward; the casts are recomputed for backward", len(recast))
            _probe_backward(dm, torch.device(unet.load_device), dtype)
            yield ForgeSession(sd_model, unet, mm, dtype, memory, resolution, self.default_guidance)

    # -- the preview ------------------------------------------------------------------------------------
    def render(self, prompts: list[str], loras: list[tuple[Path, float]], seed: int, progress: Progress) -> torch.Tensor:
        """Forge's own txt2img with ``<lora:NAME:W>`` in every prompt, one seed for all, nothing saved."""
        with ExitStack() as stack:
            stack.enter_context(self.job(progress))
            networks = _networks()
            if networks is None:
                raise HostError("Forge's built-in LoRA extension (sd_forge_lora) is not loaded; enable it to render previews")
            from modules import processing

            sd_model = _load_model()
            _check_engine(sd_model)
            tags = " ".join(f"<lora:{name}:{weight:g}>" for name, weight in self._network_names(networks, loras))
            size = self.default_resolution
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=sd_model,
                prompt=[f"{prompt} {tags}".strip() for prompt in prompts],
                negative_prompt="",
                seed=[int(seed)] * len(prompts),
                subseed=-1,
                subseed_strength=0,
                sampler_name=self.preview_sampler,
                scheduler="Automatic",
                batch_size=len(prompts),
                n_iter=1,
                steps=self.preview_steps,
                cfg_scale=self.default_guidance,
                width=size,
                height=size,
                do_not_save_samples=True,
                do_not_save_grid=True,
            )
            try:
                with closing(p):
                    processed = processing.process_images(p)
            except ZipLoraError:
                raise
            except Exception as err:  # noqa: BLE001 - Forge's failure, in one line
                raise HostError(f"Forge could not render the preview: {type(err).__name__}: {' '.join(str(err).split())}") from err
            first = int(getattr(processed, "index_of_first_image", 0) or 0)
            images = list(processed.images)[first : first + len(prompts)]
            if progress.interrupted() or len(images) < len(prompts):
                raise JobInterrupted("preview interrupted")
            return torch.stack([_pil_to_tensor(image) for image in images])

    def _network_names(self, networks: Any, loras: list[tuple[Path, float]]) -> list[tuple[str, float]]:
        """The names Forge's ``load_networks`` finds each file by (its stem); Forge's list is rescanned once
        when it lacks one of them."""

        def known(path: Path) -> bool:
            entry = networks.available_networks.get(path.stem)
            return entry is not None and _same_file(Path(entry.filename), path)

        if not all(known(path) for path, _ in loras):
            networks.list_available_networks()
        for path, _ in loras:
            if not known(path):
                raise HostError(
                    f"Forge's LoRA list has no {path.name} from {path.parent}; keep the LoRAs in {self.lora_dir()} "
                    "with names no other file there shares"
                )
        return [(path.stem, float(weight)) for path, weight in loras]


def _mirror(state: Any, p: Progress) -> None:
    """Our progress as Forge's progress bar: one job, the stage's count as its sampling steps."""
    state.job_count = 1
    state.job_no = 0
    state.sampling_steps = max(int(p.total), 0)
    state.sampling_step = min(int(p.done), max(int(p.total), 0))
    state.textinfo = f"ZipLoRA: {p.stage}" + (f" - {p.text}" if p.text else "")


def _restore_flags(root: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in root.named_parameters():
        if name in flags and p.requires_grad != flags[name]:
            p.requires_grad_(flags[name])


def _forget_shape(module: nn.Module) -> None:
    for attr in ("in_features", "out_features"):
        module.__dict__.pop(attr, None)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _pil_to_tensor(image: Any) -> torch.Tensor:
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
