"""Judging merges on the toy model: render a LoRA stack on prompts and seeds, and score what was drawn."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ziplora.hosts.base import SessionOptions
from ziplora.hosts.toy import ToyHost
from ziplora.merge.patch import patch_layers
from ziplora.preview import stack_parts
from ziplora.progress import Progress
from ziplora.schedule import ddim_sample
from ziplora.toy.scorers import Scorers

__all__ = ["CellScore", "render_stack", "score_images", "SAMPLING_STEPS", "GUIDANCE"]

SAMPLING_STEPS = 25
GUIDANCE = 4.0


@dataclass(frozen=True)
class CellScore:
    """How the scorers read a set of images meant to show ``subject`` (or not) and ``style`` (or not)."""

    images: int
    subject_right: float | None  # share whose most likely subject is the wanted one
    style_right: float | None
    both_right: float | None
    subject_probability: float | None  # mean probability of the wanted subject
    style_probability: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@torch.no_grad()
def render_stack(host: ToyHost, stack: list[tuple[Path, float]], prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Every prompt at every seed with the LoRA stack applied: [len(prompts) * len(seeds), 3, 32, 32]."""
    with host.session(SessionOptions(), Progress()) as session:
        parts = stack_parts(stack, host.families, session.device, session.dtype)
        with patch_layers(session.resolve, parts, session.device) as patches:
            patches.set_mode("merged")
            all_prompts = [p for p in prompts for _ in seeds]
            noise = torch.stack(
                [torch.randn(*session.latent_shape(32, 32), generator=torch.Generator().manual_seed(s)) for _ in prompts for s in seeds]
            )
            cond = session.encode(all_prompts)
            uncond = session.encode_negative(len(all_prompts))
            x0 = ddim_sample(session.predict, session.schedule, noise, cond, uncond, SAMPLING_STEPS, GUIDANCE)
            return session.decode(x0)


def score_images(images: torch.Tensor, scorers: Scorers, subject: str | None, style: str | None) -> CellScore:
    n = images.shape[0]
    subj_ok = style_ok = None
    subj_p = style_p = None
    if subject is not None:
        p = scorers.subject.probabilities(images)
        subj_ok = (p.argmax(-1) == scorers.subject.index(subject)).float()
        subj_p = float(p[:, scorers.subject.index(subject)].mean())
    if style is not None:
        p = scorers.style.probabilities(images)
        style_ok = (p.argmax(-1) == scorers.style.index(style)).float()
        style_p = float(p[:, scorers.style.index(style)].mean())
    both = float((subj_ok * style_ok).mean()) if subj_ok is not None and style_ok is not None else None
    return CellScore(
        n,
        None if subj_ok is None else float(subj_ok.mean()),
        None if style_ok is None else float(style_ok.mean()),
        both,
        subj_p,
        style_p,
    )
