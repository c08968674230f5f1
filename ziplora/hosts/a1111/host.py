"""``A1111Host``: AUTOMATIC1111's LoRA folders and list, its queue lock, progress bar and Interrupt button, and
the session over the loaded checkpoint, with every change a session makes undone on exit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from ziplora.errors import JobInterrupted
from ziplora.formats.families import Family
from ziplora.hosts.a1111.checks import check_model, session_dtype
from ziplora.hosts.a1111.embeddings import bundled_embeddings_registered
from ziplora.hosts.a1111.preview import render_txt2img
from ziplora.hosts.a1111.session import A1111Session
from ziplora.hosts.a1111.training_mode import attention_for_backward, frozen
from ziplora.hosts.a1111.user_loras import extra_networks_off, lora_extension, unbake
from ziplora.hosts.base import ExportDefaults, SessionOptions, list_lora_files
from ziplora.hosts.settings import read_settings
from ziplora.progress import Progress

log = logging.getLogger(__name__)

__all__ = ["A1111Host"]


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
        networks = lora_extension()
        if networks is None:
            return
        stem = Path(path).stem
        networks.networks_in_memory.pop(stem, None)
        unbake(networks, stem)
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
        check_model(sd_model)
        dtype = session_dtype(options.precision)
        if getattr(sd_model, "lowvram", False):
            log.warning(
                "ZipLoRA: --medvram: the UNet, text encoders and VAE take turns on the GPU; the merge encodes "
                "prompts before optimising, but expect a slower job"
            )
        with ExitStack() as stack:
            stack.callback(devices.torch_gc)
            stack.enter_context(extra_networks_off(sd_model))
            stack.enter_context(frozen(sd_model))
            stack.enter_context(attention_for_backward())
            stack.enter_context(bundled_embeddings_registered(sd_model, options.embeddings))
            settings = read_settings()
            resolution = options.resolution or settings.resolution
            session = A1111Session(sd_model, dtype, resolution, settings.guidance)
            stack.callback(session.close)
            yield session

    def render(self, prompts: list[str], loras: list[tuple[Path, float]], seed: int, progress: Progress) -> torch.Tensor:
        """The preview through A1111's own txt2img: ``<lora:NAME:W>`` in every prompt, one seed for all, nothing
        saved unless Settings > ZipLoRA says so."""
        with self._in_job(progress):
            return render_txt2img(prompts, loras, seed, progress, read_settings())


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
