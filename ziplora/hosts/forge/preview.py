"""The A/B preview through Forge's own txt2img: ``<lora:NAME:W>`` in every prompt, one seed for all."""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from ziplora.errors import HostError, JobInterrupted, ZipLoraError
from ziplora.hosts.settings import WebUISettings
from ziplora.progress import Progress

__all__ = ["network_names", "render_txt2img"]


def network_names(networks: Any, loras: list[tuple[Path, float]], lora_dir: Path) -> list[tuple[str, float]]:
    """The names Forge's ``load_networks`` finds each file by (its stem); Forge's list is rescanned once when it
    lacks one of them."""

    def known(path: Path) -> bool:
        entry = networks.available_networks.get(path.stem)
        return entry is not None and _same_file(Path(entry.filename), path)

    if not all(known(path) for path, _ in loras):
        networks.list_available_networks()
    for path, _ in loras:
        if not known(path):
            raise HostError(
                f"Forge's LoRA list has no {path.name} from {path.parent}; keep the LoRAs in {lora_dir} with names no other file there shares"
            )
    return [(path.stem, float(weight)) for path, weight in loras]


def render_txt2img(sd_model: Any, prompts: list[str], names: list[tuple[str, float]], seed: int, progress: Progress,
                   settings: WebUISettings, sampler: str) -> torch.Tensor:  # fmt: skip
    """Images [len(prompts), 3, H, W] in [0, 1]; called with Forge's queue lock held."""
    from modules import processing

    tags = " ".join(f"<lora:{name}:{weight:g}>" for name, weight in names)
    size = settings.resolution
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=sd_model,
        prompt=[f"{prompt} {tags}".strip() for prompt in prompts],
        negative_prompt="",
        seed=[int(seed)] * len(prompts),
        subseed=-1,
        subseed_strength=0,
        sampler_name=sampler,
        scheduler="Automatic",
        batch_size=len(prompts),
        n_iter=1,
        steps=settings.preview_steps,
        cfg_scale=settings.guidance,
        width=size,
        height=size,
        do_not_save_samples=not settings.save_previews,
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _pil_to_tensor(image: Any) -> torch.Tensor:
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
