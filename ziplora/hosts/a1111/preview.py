"""The A/B preview through A1111's own txt2img: ``<lora:NAME:W>`` in every prompt, one seed for all, nothing
saved unless Settings > ZipLoRA says so."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import torch

from ziplora.errors import HostError, JobFailed, JobInterrupted
from ziplora.hosts.a1111.session import strip_extra_networks
from ziplora.hosts.a1111.user_loras import lora_extension
from ziplora.hosts.settings import WebUISettings
from ziplora.progress import Progress

__all__ = ["render_txt2img"]


def render_txt2img(
    prompts: list[str], loras: list[tuple[Path, float]], seed: int, progress: Progress, settings: WebUISettings
) -> torch.Tensor:
    """Images [len(prompts), 3, H, W] in [0, 1]; called with A1111's queue lock held."""
    import numpy as np
    from modules import processing, shared

    networks = lora_extension()
    if networks is None:
        raise HostError("previews need the built-in Lora extension, which is disabled")
    tags = "".join(f"<lora:{_network_name(networks, Path(path))}:{weight:g}>" for path, weight in loras)
    size = settings.resolution
    n = len(prompts)
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model,
        prompt=[f"{strip_extra_networks(prompt)} {tags}".strip() for prompt in prompts],
        negative_prompt="",
        seed=[int(seed)] * n,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        steps=settings.preview_steps,
        cfg_scale=settings.guidance,
        width=size,
        height=size,
        batch_size=n,
        n_iter=1,
        do_not_save_samples=not settings.save_previews,
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
