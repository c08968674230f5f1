"""``ForgeHost``: Forge's LoRA folder and caches, its queue lock, progress bar and Interrupt button, and the
session over the loaded model, with every change a session makes undone on exit."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from ziplora.errors import HostError, JobInterrupted
from ziplora.formats.families import Family
from ziplora.hosts.base import SessionOptions, export_defaults_for, list_lora_files
from ziplora.hosts.forge.autograd import usable_for_autograd
from ziplora.hosts.forge.embeddings import bundled_embeddings_registered
from ziplora.hosts.forge.engine import check_engine, compute_dtype, current_model, load_model, lora_extension, memory_management
from ziplora.hosts.forge.memory import training_memory
from ziplora.hosts.forge.preview import network_names, render_txt2img
from ziplora.hosts.forge.session import ForgeSession
from ziplora.hosts.forge.user_loras import lora_free_objects
from ziplora.hosts.settings import WebUISettings, read_settings
from ziplora.progress import Progress

log = logging.getLogger(__name__)

__all__ = ["ForgeHost"]


class ForgeHost:
    """LoRAs live in Forge's ``--lora-dir``; the model is whatever SDXL checkpoint Forge has loaded.

    The resolution, guidance and preview settings come from Settings > ZipLoRA (``ziplora.hosts.settings``), read
    at each use. ``families`` and the keyword overrides exist so the tests can drive this adapter on the toy model
    through a stand-in of Forge; the WebUI builds it without arguments (``ziplora.hosts.webui_host``).
    """

    name = "forge"

    def __init__(
        self,
        families: tuple[Family, ...] = (Family.SDXL,),
        default_resolution: int | None = None,
        default_guidance: float | None = None,
        preview_steps: int | None = None,
        preview_sampler: str = "Euler",
        save_previews: bool | None = None,
    ) -> None:
        self.families = tuple(families)
        self.export_defaults = export_defaults_for(self.families[0])
        self.preview_sampler = preview_sampler
        # None: the setting; a value: fixed for this host
        self._overrides = dict(resolution=default_resolution, guidance=default_guidance, preview_steps=preview_steps,
                               save_previews=save_previews)  # fmt: skip
        self._state_lock = threading.Lock()
        self._owner: int | None = None  # the thread holding Forge's queue lock through job()
        self._depth = 0

    def settings(self) -> WebUISettings:
        """Settings > ZipLoRA as they are now, with this host's overrides."""
        return read_settings(**self._overrides)

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
        networks = lora_extension()
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
        sd_model = current_model()
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
            mm = memory_management()
            progress.begin_stage("Loading the model", 0)
            sd_model = load_model()
            check_engine(sd_model)
            if progress.interrupted():
                raise JobInterrupted("interrupted before the merge started; nothing was written")
            unet = sd_model.forge_objects_original.unet
            kmodel = unet.model
            dtype = compute_dtype(kmodel, options.precision)
            vae = getattr(sd_model.forge_objects, "vae", None)
            latent = (int(getattr(vae, "latent_channels", 4)), int(getattr(vae, "downscale_ratio", 8)))
            settings = self.settings()
            resolution = options.resolution or settings.resolution
            memory = training_memory(unet, resolution, latent, options.gradient_checkpointing)
            stack.enter_context(lora_free_objects(sd_model, mm, memory))
            stack.enter_context(usable_for_autograd(kmodel.diffusion_model, torch.device(unet.load_device), dtype))
            stack.enter_context(bundled_embeddings_registered(sd_model, options.embeddings))
            yield ForgeSession(sd_model, unet, mm, dtype, memory, resolution, settings.guidance)

    # -- the preview ------------------------------------------------------------------------------------
    def render(self, prompts: list[str], loras: list[tuple[Path, float]], seed: int, progress: Progress) -> torch.Tensor:
        """Forge's own txt2img with ``<lora:NAME:W>`` in every prompt, one seed for all, nothing saved unless
        Settings > ZipLoRA says so."""
        with self.job(progress):
            networks = lora_extension()
            if networks is None:
                raise HostError("Forge's built-in LoRA extension (sd_forge_lora) is not loaded; enable it to render previews")
            sd_model = load_model()
            check_engine(sd_model)
            names = network_names(networks, loras, self.lora_dir())
            return render_txt2img(sd_model, prompts, names, seed, progress, self.settings(), self.preview_sampler)


def _mirror(state: Any, p: Progress) -> None:
    """Our progress as Forge's progress bar: one job, the stage's count as its sampling steps."""
    state.job_count = 1
    state.job_no = 0
    state.sampling_steps = max(int(p.total), 0)
    state.sampling_step = min(int(p.done), max(int(p.total), 0))
    state.textinfo = f"ZipLoRA: {p.stage}" + (f" - {p.text}" if p.text else "")
