"""The AUTOMATIC1111 host: the loaded SDXL checkpoint (``shared.sd_model``), its queue lock, progress bar and
Interrupt button, and the built-in Lora extension's folder and list.

Every WebUI module (``modules.*``, the Lora extension's ``networks``) is imported inside functions, so this
file imports anywhere. What it relies on, with A1111 file and function names, is in docs/a1111.md.

A session changes host state only for the job and undoes all of it on exit, whatever happened:
- the built-in Lora's weights: A1111 bakes a prompt's ``<lora:...>`` into the weights in place, lazily, and
  keeps them baked until a module's next forward with another set; the session puts every baked module back
  to its backup and empties ``networks.loaded_networks``, and afterwards restores that list, so A1111
  re-applies the user's LoRAs on its next forward exactly as after any change of networks;
- ``requires_grad`` of every parameter (A1111 leaves the UNet's at True), sgm's own checkpoint flags;
- the cross-attention optimisation (switched to SDP for the backward pass, then back to the user's);
- open_clip's fused ``nn.MultiheadAttention`` in the second text encoder, seen through q/k/v/out ``Linear``
  views while the job needs them (LoRA files name those projections; the model has one fused matrix).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ziplora.errors import HostError, JobFailed, JobInterrupted
from ziplora.formats.families import Family
from ziplora.formats.keys import LayerKey
from ziplora.hosts.base import ExportDefaults, SessionOptions, iter_blocks, list_lora_files, resolve_in_roots
from ziplora.progress import Progress
from ziplora.schedule import Cond, NoiseSchedule

log = logging.getLogger(__name__)

__all__ = ["A1111Host", "A1111Session", "MultiheadAttentionAsLinears", "strip_extra_networks", "OPTION_DEFAULTS"]

# Settings the entry point registers (scripts/ziplora.py); read here with these fallbacks, so the host also
# works where they were never registered (tests, a script that builds the host by hand).
OPTION_DEFAULTS: dict[str, Any] = {
    "ziplora_resolution": 1024,  # the session's default resolution: data-free sampling and SDXL size conditioning
    "ziplora_guidance": 5.0,  # classifier-free guidance of the teachers' sampling and of the preview
    "ziplora_preview_steps": 20,  # sampling steps of each A/B preview image
    "ziplora_save_previews": False,  # save preview images to the txt2img outputs folder like any generation
}

_SDP_TITLE = "sdp - scaled dot product"  # modules/sd_hijack_optimizations.py SdOptimizationSdp.title()
_BACKWARD_SAFE_OPTIMIZERS = ("sdp", "sdp-no-mem", "xformers")  # memory-efficient kernels with a backward pass
_RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # modules/extra_networks.py re_extra_net
_RE_TE2 = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def strip_extra_networks(prompt: str) -> str:
    """Remove ``<lora:...>``-style tags: the conditioner would read them as words (A1111 strips them in
    processing, before ``get_learned_conditioning``)."""
    return " ".join(_RE_EXTRA_NETWORK.sub("", prompt).split())


def _option(name: str) -> Any:
    from modules import shared

    return getattr(shared.opts, name, OPTION_DEFAULTS[name])


def _networks() -> Any | None:
    """The built-in Lora extension's ``networks`` module, or None when that extension is disabled."""
    try:
        import networks  # type: ignore[import-not-found]
    except ImportError:
        return None
    return networks


class MultiheadAttentionAsLinears(nn.Module):
    """open_clip's fused ``nn.MultiheadAttention`` as four ``Linear`` layers, for the duration of one job.

    kohya files name the second text encoder's projections ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` /
    ``out_proj``; A1111's OpenCLIP bigG has one ``in_proj_weight`` instead (A1111 adds a q/k/v LoRA to its
    thirds, networks.py ``network_apply_weights``). Here q/k/v are views of those thirds (no copy) and
    ``out_proj`` is the MHA's own, so patching them patches exactly what A1111 would, and the attention is
    computed from their outputs. The MHA itself is never modified.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not getattr(mha, "_qkv_same_embed_dim", False) or mha.bias_k is not None or mha.add_zero_attn:
            raise HostError(
                "the second text encoder's attention has an unusual layout (separate q/k/v widths or bias_k); cannot merge its layers"
            )
        d = mha.embed_dim
        self.embed_dim = d
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        weight = mha.in_proj_weight.detach()  # views share its storage; nothing here ever writes to them
        bias = None if mha.in_proj_bias is None else mha.in_proj_bias.detach()
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            linear = nn.Linear(d, d, bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(weight[i * d : (i + 1) * d], requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias[i * d : (i + 1) * d], requires_grad=False)
            setattr(self, name, linear)
        self.out_proj = mha.out_proj
        self.original = [mha]  # a list: not a submodule, so named_modules() shows the four projections only

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """``nn.MultiheadAttention.forward``'s signature; attention weights are never returned (open_clip
        asks for none)."""
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        length, batch, _ = query.shape
        source = key.shape[0]
        h = self.num_heads
        q = self.q_proj(query).reshape(length, batch, h, -1).permute(1, 2, 0, 3)
        k = self.k_proj(key).reshape(source, batch, h, -1).permute(1, 2, 0, 3)
        v = self.v_proj(value).reshape(source, batch, h, -1).permute(1, 2, 0, 3)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, h, length, source, q.dtype)
        causal = is_causal and mask is None
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, -1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.original[0].in_proj_weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.original[0].in_proj_bias


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    length: int,
    source: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """MHA's masks (bool: True = masked out; float: added) as one float mask for scaled_dot_product_attention."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        mask = m.reshape(batch, heads, length, source) if m.dim() == 3 else m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=k.device).masked_fill(k, float("-inf"))
        k = k.to(dtype).reshape(batch, 1, 1, source)
        mask = k if mask is None else mask + k
    return mask


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
        te1, te2 = _text_encoders(sd_model)
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


def _text_encoders(sd_model: Any) -> tuple[nn.Module, nn.Module]:
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


def _check_model(sd_model: Any) -> None:
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
    _text_encoders(sd_model)


def _session_dtype(precision: str) -> torch.dtype:
    from modules import devices

    dtype = devices.dtype_unet
    if precision == "auto" or _PRECISIONS.get(precision) == dtype:
        return dtype
    asked = _DTYPE_NAMES.get(_PRECISIONS.get(precision, dtype), precision)
    have = _DTYPE_NAMES.get(dtype, str(dtype))
    hint = "start the WebUI with --no-half" if precision == "fp32" else "choose precision auto"
    raise HostError(f"{asked} was asked for (or needed after an overflow) but this WebUI runs the UNet in {have}; {hint}")


@contextmanager
def _extra_networks_off(sd_model: nn.Module) -> Iterator[None]:
    """The bare checkpoint for the job: no hypernetwork in the attention, every module at its original weight
    and the Lora extension idle; both selections back afterwards.

    ``networks.load_networks([])`` alone is not enough: baked weights are restored only inside each module's
    next patched forward, and our fused layers read ``weight`` without calling it. So every module holding a
    baked set (``network_current_names``) is restored from its backup here, and marked unbaked; A1111 then
    re-applies whatever ``loaded_networks`` holds after the job on each module's next forward. Hypernetworks
    (``shared.loaded_hypernetworks``, applied inside every cross-attention) also stay selected after a
    generation that used them; they are set aside the same way.
    """
    from modules import shared

    hypernetworks = getattr(shared, "loaded_hypernetworks", None)
    hypernetworks = hypernetworks if isinstance(hypernetworks, list) else []
    networks = _networks()
    loaded = networks.loaded_networks if networks is not None else []
    saved_hypernetworks, saved_loaded = list(hypernetworks), list(loaded)
    try:
        hypernetworks.clear()
        loaded.clear()
        if networks is not None:
            with torch.no_grad():  # A1111 restores inside forwards, under no_grad; the UNet's weights require grad
                for module in sd_model.modules():
                    if getattr(module, "network_current_names", ()) != ():
                        networks.network_restore_weights_from_backup(module)
                        module.network_current_names = ()
        yield
    finally:
        loaded[:] = saved_loaded
        hypernetworks[:] = saved_hypernetworks


def _loaded_model() -> nn.Module | None:
    """The loaded checkpoint, or None; never loads one (``shared.sd_model`` would)."""
    try:
        from modules import sd_models
    except ImportError:
        return None
    return getattr(getattr(sd_models, "model_data", None), "sd_model", None)


def _unbake(networks: Any, name: str) -> int:
    """Undo the bake of LoRA ``name`` wherever A1111's default (non-functional) path holds it in the weights.

    A rewritten file keeps its name, so A1111's marker of what a module holds (``network_current_names``:
    name and multipliers, no file time) still matches on the next generation with ``<lora:NAME:...>``, and
    ``network_apply_weights`` keeps the OLD tensors baked in although ``load_networks`` re-read the file.
    Putting those modules back to their backups (and marking them unbaked) makes the next forward apply the
    new file; a generation without the LoRA then finds clean weights. Returns how many modules were reset."""
    model = _loaded_model()
    if model is None:
        return 0
    count = 0
    with torch.no_grad():  # restore_weights_backup copies in place; the UNet's weights require grad
        for module in model.modules():
            current = getattr(module, "network_current_names", ())
            if any(isinstance(entry, tuple) and entry and entry[0] == name for entry in current):
                networks.network_restore_weights_from_backup(module)
                module.network_current_names = ()
                count += 1
    return count


@contextmanager
def _frozen(sd_model: nn.Module) -> Iterator[None]:
    """No parameter of the model trains (A1111 leaves the UNet's requires_grad at True); sgm's own gradient
    checkpointing is off (its CheckpointFunction would drop the mergers' gradients). All restored after."""
    flags = [(p, p.requires_grad) for p in sd_model.parameters()]
    checkpoint_flags = [
        (m, attr, getattr(m, attr))
        for m in sd_model.model.diffusion_model.modules()
        for attr in ("checkpoint", "use_checkpoint")
        if getattr(m, attr, None) is True
    ]
    try:
        sd_model.requires_grad_(False)
        for m, attr, _ in checkpoint_flags:
            setattr(m, attr, False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, attr, value in checkpoint_flags:
            setattr(m, attr, value)


@contextmanager
def _attention_for_backward() -> Iterator[None]:
    """SDP cross-attention for the job (Doggettx / V1 / InvokeAI keep every attention map for backward), then
    the user's choice again."""
    from modules import sd_hijack

    previous = getattr(sd_hijack, "current_optimizer", None)
    name = getattr(previous, "name", None)
    if name in _BACKWARD_SAFE_OPTIMIZERS:
        yield
        return
    sd_hijack.model_hijack.apply_optimizations(_SDP_TITLE)
    try:
        yield
    finally:
        sd_hijack.model_hijack.apply_optimizations(previous.title() if previous is not None else "None")


class A1111Host:
    """AUTOMATIC1111 (v1.10): the loaded SDXL checkpoint; LoRAs in ``--lora-dir`` (and the old LyCORIS folder)."""

    name = "a1111"
    families = (Family.SDXL,)
    export_defaults = ExportDefaults()

    def __init__(self) -> None:
        self._job_thread: int | None = None  # the thread inside job(), which holds the queue lock

    # -- files --------------------------------------------------------------------------------------------------
    def lora_dir(self) -> Path:
        from modules import shared

        return Path(shared.cmd_opts.lora_dir)

    def list_loras(self) -> list[Path]:
        """What the Lora tab lists too: the Lora folder and the LyCORIS back-compat folder, subfolders included."""
        from modules import shared

        folders = [self.lora_dir()]
        lyco = getattr(shared.cmd_opts, "lyco_dir_backcompat", None)
        if lyco:
            folders.append(Path(lyco))
        seen: dict[Path, Path] = {}
        for folder in folders:
            for path in list_lora_files(folder):
                seen.setdefault(path.resolve(), path)
        return sorted(seen.values(), key=lambda p: (p.stem.lower(), str(p)))

    def after_write(self, path: Path) -> None:
        """Refresh the Lora extension's list, so ``<lora:NAME:1>`` works at once and the card shows after the
        extra-networks refresh; drop its in-memory copy of a rewritten file."""
        networks = _networks()
        if networks is None:
            return
        stem = Path(path).stem
        networks.networks_in_memory.pop(stem, None)
        _unbake(networks, stem)
        networks.list_available_networks()

    def default_prompts(self, content_words: list[str], style_words: list[str]) -> tuple[str, str]:
        subject = ", ".join(content_words)
        style = ", ".join(style_words)
        return (f"a photo of {subject}" if subject else "a photo"), (f"a picture, {style}" if style else "a picture, artwork")

    # -- the WebUI's queue, progress bar and Interrupt button ----------------------------------------------------
    @contextmanager
    def job(self, progress: Progress) -> Iterator[None]:
        """Hold ``queue_lock`` (one GPU job at a time with txt2img and the API), show our progress in
        ``shared.state`` and stop on its Interrupt. Waits while a generation runs (interruptible)."""
        from modules import call_queue, shared

        lock = call_queue.queue_lock  # FIFOLock, not reentrant: nothing queue-locked may be called inside
        if not lock.acquire(blocking=False):
            progress.begin_stage("Waiting for the WebUI to finish its current job", 0)
            while not lock.acquire(blocking=False):
                if progress.interrupted():
                    raise JobInterrupted("interrupted while waiting for the WebUI's queue; nothing was done")
                time.sleep(0.05)
        state = shared.state
        removers: list[Callable[[], None]] = []
        self._job_thread = threading.get_ident()
        try:
            state.begin(job="ziplora")
            mirror = _state_mirror(state)
            removers.append(progress.add_listener(mirror))
            removers.append(progress.add_interrupt_source(lambda: bool(state.interrupted)))
            mirror(progress)
            yield
        finally:
            self._job_thread = None
            for remove in removers:
                remove()
            try:
                state.end()
            finally:
                # as modules/call_queue.py wrap_gradio_call does after every GPU call
                state.interrupted = state.skipped = state.stopping_generation = False
                lock.release()

    @contextmanager
    def _in_job(self, progress: Progress) -> Iterator[None]:
        """Inside ``job`` on this thread already (the service's way), or in one of its own: the queue lock is
        not reentrant, so it is taken once per thread."""
        if self._job_thread == threading.get_ident():
            yield
        else:
            with self.job(progress):
                yield

    # -- the model ----------------------------------------------------------------------------------------------
    @contextmanager
    def session(self, options: SessionOptions, progress: Progress) -> Iterator[A1111Session]:
        """The loaded checkpoint, ready for forward and backward passes; every change undone on exit."""
        with self._in_job(progress), self._session(options) as session:
            yield session

    @contextmanager
    def _session(self, options: SessionOptions) -> Iterator[A1111Session]:
        from modules import devices, shared

        sd_model = shared.sd_model  # loads the selected checkpoint if none is loaded yet
        _check_model(sd_model)
        dtype = _session_dtype(options.precision)
        if getattr(sd_model, "lowvram", False):
            log.warning(
                "ZipLoRA: --medvram: the UNet, text encoders and VAE take turns on the GPU; the merge encodes "
                "prompts before optimising, but expect a slower job"
            )
        with ExitStack() as stack:
            stack.callback(devices.torch_gc)
            stack.enter_context(_extra_networks_off(sd_model))
            stack.enter_context(_frozen(sd_model))
            stack.enter_context(_attention_for_backward())
            resolution = options.resolution or int(_option("ziplora_resolution"))
            session = A1111Session(sd_model, dtype, resolution, float(_option("ziplora_guidance")))
            stack.callback(session.close)
            yield session

    def render(self, prompts: list[str], loras: list[tuple[Path, float]], seed: int, progress: Progress) -> torch.Tensor:
        """The preview through A1111's own txt2img: ``<lora:NAME:W>`` in every prompt, one seed for all, nothing
        saved unless the ziplora_save_previews setting says so."""
        with self._in_job(progress):
            return self._render(prompts, loras, seed, progress)

    def _render(self, prompts: list[str], loras: list[tuple[Path, float]], seed: int, progress: Progress) -> torch.Tensor:
        import numpy as np
        from modules import processing, shared

        networks = _networks()
        if networks is None:
            raise HostError("previews need the built-in Lora extension, which is disabled")
        tags = "".join(f"<lora:{self._network_name(networks, Path(path))}:{weight:g}>" for path, weight in loras)
        size = int(_option("ziplora_resolution"))
        n = len(prompts)
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model,
            prompt=[f"{strip_extra_networks(prompt)} {tags}".strip() for prompt in prompts],
            negative_prompt="",
            seed=[int(seed)] * n,
            sampler_name="DPM++ 2M",
            scheduler="Karras",
            steps=int(_option("ziplora_preview_steps")),
            cfg_scale=float(_option("ziplora_guidance")),
            width=size,
            height=size,
            batch_size=n,
            n_iter=1,
            do_not_save_samples=not bool(_option("ziplora_save_previews")),
            do_not_save_grid=True,
            override_settings={"sd_lora": "None"},  # no globally added LoRA in the A/B rows
        )
        try:
            with closing(p), _interrupts_reach_the_webui(progress, shared.state):
                processed = processing.process_images(p)
        finally:
            networks.load_networks([])  # un-stick: no preview LoRA stays selected for the next forward
        if shared.state.interrupted or progress.interrupted():
            raise JobInterrupted("preview interrupted")
        first = getattr(processed, "index_of_first_image", 0)
        images = processed.images[first : first + n]
        if len(images) != n:
            raise JobFailed(f"the WebUI returned {len(images)} preview images for {n} prompts")
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def _network_name(networks: Any, path: Path) -> str:
        """The name ``<lora:NAME:W>`` reaches ``path`` by (its stem), checked against the Lora extension's list."""
        name = path.stem
        entry = networks.available_networks.get(name)
        if entry is None:
            networks.list_available_networks()
            entry = networks.available_networks.get(name)
        if entry is None:
            raise HostError(f"the Lora extension does not list {path.name}; is it inside --lora-dir?")
        if Path(entry.filename).resolve() != path.resolve():
            raise HostError(
                f"two LoRA files are named {name!r} ({path} and {entry.filename}); <lora:{name}:1> reaches only the second, rename one"
            )
        if ":" in name or ">" in name:
            raise HostError(f"{path.name}: a name with ':' or '>' cannot be written as <lora:NAME:1>; rename the file")
        return name


@contextmanager
def _interrupts_reach_the_webui(progress: Progress, state: Any) -> Iterator[None]:
    """While A1111 renders, our interrupt (the tab's button, the API route) presses the WebUI's: its sampler
    polls only ``shared.state.interrupted``."""
    done = threading.Event()

    def watch() -> None:
        while True:
            if progress.interrupted():
                state.interrupt()
                return
            if done.wait(0.1):
                return

    watcher = threading.Thread(target=watch, name="ziplora-interrupt-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _state_mirror(state: Any) -> Callable[[Progress], None]:
    """Our progress in ``shared.state``: one job, its stage's count as sampling steps, the stage as text
    (modules/progress.py progressapi reads job_no/job_count and sampling_step/sampling_steps)."""

    def mirror(progress: Progress) -> None:
        snap = progress.snapshot()
        state.job_count = 1
        state.job_no = 0
        state.sampling_steps = snap.total
        state.sampling_step = snap.done
        state.textinfo = f"ZipLoRA: {snap.line()}" if snap.stage else "ZipLoRA"

    return mirror
