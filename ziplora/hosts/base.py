"""The host protocol: what the core needs from a WebUI (or the toy model), and nothing more.

A ``Host`` knows where LoRAs live and opens a ``ModelSession`` for one job: the loaded model's networks as
torch modules, prompt encoding, prediction, the noise schedule and the VAE. The session's context manager
owns every change to host state (locks, the host's own LoRA patches, requires_grad, attention settings)
and must undo them all on exit, whatever happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ziplora.errors import HostError
from ziplora.formats.families import Family
from ziplora.formats.keys import LayerKey
from ziplora.progress import Progress
from ziplora.schedule import Cond, NoiseSchedule

if TYPE_CHECKING:
    from ziplora.hosts.embeddings import BundledEmbedding

__all__ = [
    "ModelSession",
    "Host",
    "ExportDefaults",
    "FilesHost",
    "export_defaults_for",
    "resolve_in_roots",
    "list_lora_files",
    "SessionOptions",
    "available_memory",
]


@dataclass(frozen=True)
class ExportDefaults:
    base_model_version: str = "sdxl_base_v1-0"
    architecture: str = "stable-diffusion-xl-v1-base/lora"
    resolution: str = "1024x1024"
    sd_version: str = "SDXL"


@dataclass(frozen=True)
class SessionOptions:
    """What a job asks of the host when it opens the model."""

    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    gradient_checkpointing: bool = False
    resolution: int | None = None  # the job's image size (SDXL's size conditioning); None: the host's default
    # the source LoRAs' bundled textual-inversion embeddings: a WebUI host registers them while the session
    # encodes prompts and takes them out afterwards (ziplora.hosts.embeddings); hosts without an embedding
    # database (toy, files) ignore them
    embeddings: tuple[BundledEmbedding, ...] = ()


class ModelSession(Protocol):
    device: torch.device
    dtype: torch.dtype  # the compute dtype of the UNet
    schedule: NoiseSchedule
    roots: dict[str, nn.Module]  # "unet", "te1", "te2": trees whose module paths are our canonical paths
    default_resolution: int
    default_guidance: float
    text_encoder_grad: bool  # can encode() run with gradients (so text-encoder mergers can learn)?

    def resolve(self, key: LayerKey) -> tuple[nn.Module, str]:
        """(parent module, attribute name) of a canonical layer key."""

    def encode(self, prompts: list[str]) -> Cond: ...

    def encode_negative(self, n: int) -> Cond:
        """The unconditional (empty negative prompt) conditioning for guidance."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [0, 1]."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> latents."""

    def checkpoint_blocks(self) -> list[nn.Module]:
        """Blocks worth wrapping in gradient checkpointing (the UNet's input/middle/output blocks)."""


class Host(Protocol):
    name: str
    families: tuple[Family, ...]  # which LoRAs this host's model takes
    export_defaults: ExportDefaults

    def lora_dir(self) -> Path: ...

    def list_loras(self) -> list[Path]: ...

    def session(self, options: SessionOptions, progress: Progress) -> AbstractContextManager[ModelSession]: ...

    def after_write(self, path: Path) -> None:
        """Make a new or rewritten file usable at once (refresh lists, drop caches of that path)."""

    def job(self, progress: Progress) -> AbstractContextManager[None]:
        """Wrap one whole job (merge, preview, rewrite): the host's queue lock, its progress bar and its
        Interrupt button (A1111/Forge ``shared.state``), all released or undone on exit."""

    def render(self, prompts: list[str], loras: list[tuple[Path, float]], seed: int, progress: Progress) -> torch.Tensor:
        """Images [len(prompts), 3, H, W] in [0, 1] with the LoRA stack applied, one seed for every prompt.

        Called inside ``job``; the WebUIs render through their own txt2img, nothing saved to outputs."""

    # Optional (looked up with getattr):
    #   default_prompts(content_words, style_words) -> (content prompt, style prompt)
    #   lora_hash(path) -> the hash the WebUI writes into infotexts, when it is not the addnet hash (Forge)


def resolve_in_roots(roots: dict[str, nn.Module], key: LayerKey) -> tuple[nn.Module, str]:
    """Default resolver: the key's path inside ``roots[component]``."""
    root = roots.get(key.component)
    if root is None:
        raise HostError(f"this model has no {key.component} network for {key.path}")
    parent_path, _, attr = key.path.rpartition(".")
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
    except AttributeError:
        raise HostError(f"{key} names no module of the loaded model") from None
    if not hasattr(parent, attr) or not isinstance(getattr(parent, attr), nn.Module):
        raise HostError(f"{key} names no module of the loaded model")
    return parent, attr


def list_lora_files(folder: Path) -> list[Path]:
    """Every ``.safetensors`` below ``folder`` (subfolders too, as the WebUIs scan), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.rglob("*.safetensors") if p.is_file()), key=lambda p: (p.stem.lower(), str(p)))


def iter_blocks(unet: nn.Module) -> Iterator[nn.Module]:
    """sgm layout: each input block, the middle block, each output block."""
    for name in ("input_blocks", "output_blocks"):
        yield from getattr(unet, name, [])
    middle = getattr(unet, "middle_block", None)
    if middle is not None:
        yield middle


def export_defaults_for(family: Family) -> ExportDefaults:
    if family == Family.TOYXL:
        return ExportDefaults("toyxl_v1", "toyxl-v1/lora", "32x32", "Unknown")
    return ExportDefaults()


class FilesHost:
    """No model at all: enough for direct merges of files (the CLI), which need no forward pass."""

    name = "files"
    families = (Family.SDXL, Family.TOYXL)
    export_defaults = ExportDefaults()

    def __init__(self, folder: Path) -> None:
        self._folder = Path(folder)

    def lora_dir(self) -> Path:
        return self._folder

    def list_loras(self) -> list[Path]:
        return list_lora_files(self._folder)

    def session(self, options: SessionOptions, progress: Progress) -> AbstractContextManager[ModelSession]:
        raise HostError("a ZipLoRA merge needs a model: use the WebUI tab or --host toy")

    def after_write(self, path: Path) -> None:
        pass

    def job(self, progress: Progress) -> AbstractContextManager[None]:
        return nullcontext()

    def render(self, prompts: list[str], loras: list[tuple[Path, float]], seed: int, progress: Progress) -> torch.Tensor:
        raise HostError("previews need a model: use the WebUI tab or the toy host")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for the job: the GPU's free memory, or the system's available RAM on the CPU (Linux)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no answer is an answer: the caller keeps its default
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
