"""The states ZipLoRA trains on, with their teacher targets.

Data-free (the default): each LoRA alone samples its own prompt; every state (x_t, t) of its DDIM
trajectory is kept together with its own conditional prediction there, which is exactly the teacher
target, obtained for free. Reference images (an option): VAE-encode them, noise each at random t, and run
the teacher once per noised copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ziplora.errors import JobInterrupted
from ziplora.progress import Progress
from ziplora.schedule import Cond, cond_repeat, ddim_sample

if TYPE_CHECKING:
    from ziplora.hosts.base import ModelSession
    from ziplora.merge.patch import PatchSet

__all__ = ["ConceptInputs", "TrainingInputs", "data_free_inputs", "reference_inputs", "InputOptions"]


@dataclass
class ConceptInputs:
    """N training states of one concept, their targets, and the (single) prompt's conditioning."""

    prompt: str
    x_t: torch.Tensor  # [N, C, h, w]
    t: torch.Tensor  # [N]
    target: torch.Tensor  # [N, C, h, w]: the teacher's conditional output at (x_t, t)
    cond: Cond  # batch 1

    def __len__(self) -> int:
        return int(self.x_t.shape[0])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Cond]:
        return self.x_t[index], self.t[index], self.target[index], cond_repeat(self.cond, len(index))


@dataclass
class TrainingInputs:
    content: ConceptInputs
    style: ConceptInputs
    kind: str  # "data-free" | "reference images"
    images: dict[str, torch.Tensor] | None = None  # the teachers' own samples, [0, 1] (data-free only)


@dataclass(frozen=True)
class InputOptions:
    width: int
    height: int
    samples: int = 2  # trajectories (data-free) or noised copies per image (reference)
    sampling_steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    keep_images: bool = False


def _noise(session: ModelSession, n: int, width: int, height: int, seed: int) -> torch.Tensor:
    shape = session.latent_shape(width, height)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g).to(session.device, session.dtype)


@torch.no_grad()
def _concept_from_sampling(
    session: ModelSession,
    patches: PatchSet,
    mode: str,
    prompt: str,
    options: InputOptions,
    seed: int,
    progress: Progress,
    offset: int,
    total: int,
) -> tuple[ConceptInputs, torch.Tensor | None]:
    states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_step(i: int, x: torch.Tensor, t: torch.Tensor, out_c: torch.Tensor) -> None:
        states.append((x.detach().clone(), t.detach().clone(), out_c.detach().clone()))
        if progress.interrupted():
            raise JobInterrupted("interrupted while preparing the inputs; nothing was written")
        progress.advance(offset + len(states) // 1, f"{mode} teacher, step {i + 1}/{options.sampling_steps}")

    with patches.mode_of(mode):
        cond = session.encode([prompt])
        uncond = session.encode_negative(1)
        noise = _noise(session, options.samples, options.width, options.height, seed)
        x0 = ddim_sample(
            session.predict,
            session.schedule,
            noise,
            cond_repeat(cond, options.samples),
            cond_repeat(uncond, options.samples),
            options.sampling_steps,
            options.guidance,
            on_step=on_step,
        )
        images = session.decode(x0) if options.keep_images else None
    x_t = torch.cat([s[0] for s in states])
    t = torch.cat([s[1] for s in states])
    target = torch.cat([s[2] for s in states]).to(session.dtype)
    return ConceptInputs(prompt, x_t, t, target, {k: v.detach() for k, v in cond.items()}), images


def data_free_inputs(
    session: ModelSession,
    patches: PatchSet,
    content_prompt: str,
    style_prompt: str,
    options: InputOptions,
    progress: Progress,
) -> TrainingInputs:
    """Sample each LoRA alone on its own prompt and keep every state with the teacher's prediction."""
    per_concept = options.sampling_steps
    progress.begin_stage("Sampling the two LoRAs alone", 2 * per_concept)
    content, c_img = _concept_from_sampling(
        session, patches, "content", content_prompt, options, options.seed, progress, 0, 2 * per_concept
    )
    style, s_img = _concept_from_sampling(
        session, patches, "style", style_prompt, options, options.seed + 1000, progress, per_concept, 2 * per_concept
    )
    images = {"content": c_img, "style": s_img} if options.keep_images else None
    return TrainingInputs(content, style, "data-free", images)  # type: ignore[arg-type]


@torch.no_grad()
def _concept_from_images(
    session: ModelSession,
    patches: PatchSet,
    mode: str,
    prompt: str,
    images: torch.Tensor,
    options: InputOptions,
    seed: int,
    progress: Progress,
) -> ConceptInputs:
    g = torch.Generator().manual_seed(seed)
    latents = session.encode_images(images.to(session.device)).to(session.dtype)
    latents = latents.repeat_interleave(options.samples, dim=0)
    n = latents.shape[0]
    t = torch.randint(0, session.schedule.num_timesteps, (n,), generator=g).to(session.device)
    noise = torch.randn(latents.shape, generator=g).to(session.device, session.dtype)
    x_t = session.schedule.add_noise(latents, noise, t)
    with patches.mode_of(mode):
        cond = session.encode([prompt])
        targets = []
        for i in range(n):
            if progress.interrupted():
                raise JobInterrupted("interrupted while preparing the inputs; nothing was written")
            targets.append(session.predict(x_t[i : i + 1], t[i : i + 1], cond))
    return ConceptInputs(prompt, x_t, t, torch.cat(targets).to(session.dtype), {k: v.detach() for k, v in cond.items()})


def reference_inputs(
    session: ModelSession,
    patches: PatchSet,
    content_prompt: str,
    style_prompt: str,
    content_images: torch.Tensor,
    style_images: torch.Tensor,
    options: InputOptions,
    progress: Progress,
) -> TrainingInputs:
    """Noise the user's reference images at random t; the teachers' outputs there are the targets."""
    progress.begin_stage("Encoding the reference images", 2)
    content = _concept_from_images(session, patches, "content", content_prompt, content_images, options, options.seed, progress)
    progress.advance(1)
    style = _concept_from_images(session, patches, "style", style_prompt, style_images, options, options.seed + 1000, progress)
    progress.advance(2)
    return TrainingInputs(content, style, "reference images")
