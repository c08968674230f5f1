"""The toy host: the host protocol over the bundled ToyXL model (demo, standalone tab, tests, benchmarks)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from ziplora.errors import HostError
from ziplora.formats.families import Family
from ziplora.formats.keys import LayerKey
from ziplora.hosts.base import SessionOptions, export_defaults_for, iter_blocks, list_lora_files, resolve_in_roots
from ziplora.progress import Progress
from ziplora.schedule import Cond, NoiseSchedule

__all__ = ["ToyHost", "ToySession", "TOY_EXPORT"]

TOY_EXPORT = export_defaults_for(Family.TOYXL)


class ToySession:
    """One job's view of a ToyXL model (CPU, fp32)."""

    default_resolution = 32
    default_guidance = 4.0
    text_encoder_grad = True

    def __init__(self, model, dtype: torch.dtype = torch.float32) -> None:  # type: ignore[no-untyped-def]
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = dtype
        self.schedule: NoiseSchedule = model.schedule
        self.roots: dict[str, nn.Module] = {"unet": model.unet, "te1": model.te1, "te2": model.te2}

    def resolve(self, key: LayerKey) -> tuple[nn.Module, str]:
        return resolve_in_roots(self.roots, key)

    def encode(self, prompts: list[str]) -> Cond:
        return self.model.encode(prompts)

    def encode_negative(self, n: int) -> Cond:
        return self.model.encode([""] * n)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.model.predict(x_t, t, cond)

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        c, _, _ = self.model.latent_shape
        return (c, height // 2, width // 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode_latents(latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (32, 32):
            images = torch.nn.functional.interpolate(images, size=(32, 32), mode="area")
        return self.model.encode_images(images)

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(iter_blocks(self.model.unet))


class ToyHost:
    """LoRAs live in ``lora_dir``; the model is the bundled ToyXL unless one is given (tests)."""

    name = "toy"
    families = (Family.TOYXL,)
    export_defaults = TOY_EXPORT

    def __init__(self, lora_dir: str | Path, model=None) -> None:  # type: ignore[no-untyped-def]
        self._lora_dir = Path(lora_dir)
        self._model = model
        self._lock = threading.Lock()  # one job at a time on the one model
        self.refreshed: list[Path] = []

    @classmethod
    def with_bundled_loras(cls, lora_dir: str | Path) -> ToyHost:
        """A host whose folder holds copies of the bundled subject and style LoRAs (copied once)."""
        from ziplora.toy.assets import bundled_lora_files

        folder = Path(lora_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for src in bundled_lora_files():
            for companion in (src, src.with_suffix(".json")):
                dst = folder / companion.name
                if companion.exists() and not dst.exists():
                    shutil.copy2(companion, dst)
        return cls(folder)

    @property
    def model(self):  # type: ignore[no-untyped-def]
        if self._model is None:
            from ziplora.toy.assets import load_base_model

            self._model = load_base_model()
        return self._model

    def lora_dir(self) -> Path:
        return self._lora_dir

    def list_loras(self) -> list[Path]:
        return list_lora_files(self._lora_dir)

    def default_prompts(self, content_words: list[str], style_words: list[str]) -> tuple[str, str]:
        subject = " ".join(content_words) or "shape"
        style = " ".join(style_words) or "style"
        return f"a {subject}", f"a shape in {style}"

    @contextmanager
    def session(self, options: SessionOptions, progress: Progress) -> Iterator[ToySession]:
        if options.precision not in ("auto", "fp32"):
            raise HostError(f"the toy model runs in fp32 on the CPU; precision {options.precision} is not available")
        if not self._lock.acquire(blocking=False):
            from ziplora.errors import BusyError

            raise BusyError("another merge is running on this model; wait for it to finish")
        model = self.model
        flags = [(p, p.requires_grad) for p in model.parameters()]
        training = model.training
        try:
            model.eval()
            model.requires_grad_(False)
            yield ToySession(model)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(training)
            self._lock.release()

    def after_write(self, path: Path) -> None:
        self.refreshed.append(path)

    def job(self, progress: Progress) -> nullcontext[None]:
        return nullcontext()

    def render(self, prompts: list[str], loras: list[tuple[Path, float]], seed: int, progress: Progress) -> torch.Tensor:
        from ziplora.merge.patch import patch_layers
        from ziplora.preview import sample_images, stack_parts

        with self.session(SessionOptions(), progress) as session:
            parts = stack_parts(loras, self.families, session.device, session.dtype)
            with patch_layers(session.resolve, parts, session.device) as patches:
                patches.set_mode("merged")
                return sample_images(session, prompts, seed, 25, session.default_guidance, 32, 32)
