"""The toy world: procedurally drawn 32x32 images of shapes (subjects) in renderings (styles).

Base subjects and styles teach the base model; the novel ones are never shown to it and exist only for the
LoRAs (DreamBooth-style, behind rare-token identifiers) and for the scorers that judge merges.
Everything here is vectorised torch on the CPU and seeded by the caller's ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "IMAGE_SIZE",
    "BASE_SUBJECTS",
    "NOVEL_SUBJECTS",
    "ALL_SUBJECTS",
    "BASE_STYLES",
    "NOVEL_STYLES",
    "ALL_STYLES",
    "Style",
    "render",
    "random_batch",
]

IMAGE_SIZE = 32
_SUPERSAMPLE = 2

BASE_SUBJECTS = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "hourglass")
NOVEL_SUBJECTS = ("heart", "crescent", "tee")
ALL_SUBJECTS = BASE_SUBJECTS + NOVEL_SUBJECTS


@dataclass(frozen=True)
class Style:
    """A rendering: two ink colours, a paper colour, a texture and a stroke (fill or outline)."""

    name: str
    ink: tuple[float, float, float]
    ink2: tuple[float, float, float]
    paper: tuple[float, float, float]
    texture: str  # solid | hstripes | vstripes | diagonal | dots | checker
    outline: bool = False


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    v = int(hex_colour.lstrip("#"), 16)
    return ((v >> 16 & 255) / 255.0, (v >> 8 & 255) / 255.0, (v & 255) / 255.0)


BASE_STYLES = (
    Style("crimson", _rgb("d01818"), _rgb("d01818"), _rgb("f4f4f4"), "solid"),
    Style("ocean", _rgb("1040c0"), _rgb("80c8ff"), _rgb("f8f0b0"), "hstripes"),
    Style("forest", _rgb("106010"), _rgb("90e040"), _rgb("e8d8b0"), "dots"),
    Style("night", _rgb("ffe020"), _rgb("ffe020"), _rgb("101840"), "solid", outline=True),
    Style("candy", _rgb("ff60b0"), _rgb("ffffff"), _rgb("a0f0d0"), "checker"),
    Style("ember", _rgb("ff8000"), _rgb("801000"), _rgb("080808"), "vstripes"),
)
NOVEL_STYLES = (
    Style("zebra", _rgb("000000"), _rgb("ffffff"), _rgb("909090"), "diagonal"),
    Style("neon", _rgb("00ffff"), _rgb("00ffff"), _rgb("a000a0"), "solid", outline=True),
    Style("cocoa", _rgb("703810"), _rgb("e0b070"), _rgb("40a0a0"), "checker"),
)
ALL_STYLES = BASE_STYLES + NOVEL_STYLES
BASE_STYLE_NAMES = tuple(s.name for s in BASE_STYLES)
NOVEL_STYLE_NAMES = tuple(s.name for s in NOVEL_STYLES)
ALL_STYLE_NAMES = BASE_STYLE_NAMES + NOVEL_STYLE_NAMES
_STYLE_BY_NAME = {s.name: s for s in ALL_STYLES}


def _shape_mask(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Soft-free boolean inside-mask of a shape in its own frame (roughly the unit disc, y up)."""
    r = torch.sqrt(x * x + y * y)
    if name == "circle":
        return r < 0.8
    if name == "square":
        return torch.maximum(x.abs(), y.abs()) < 0.68
    if name == "triangle":
        return (y > -0.62) & (y < 0.8 - 1.55 * x.abs())
    if name == "cross":
        return ((x.abs() < 0.24) & (y.abs() < 0.82)) | ((y.abs() < 0.24) & (x.abs() < 0.82))
    if name == "ring":
        return (r < 0.82) & (r > 0.46)
    if name == "diamond":
        return x.abs() + y.abs() < 0.88
    if name == "star":
        theta = torch.atan2(y, x) - math.pi / 2
        k = torch.cos(5 * theta)
        return r < 0.5 + 0.36 * k
    if name == "hourglass":
        return (x.abs() < y.abs() * 0.95 + 0.06) & (y.abs() < 0.8)
    if name == "heart":
        xs, ys = x * 1.25, y * 1.25 + 0.15
        return (xs * xs + ys * ys - 0.55) ** 3 - xs * xs * ys**3 < 0
    if name == "crescent":
        return (r < 0.82) & ((x - 0.38) ** 2 + (y - 0.12) ** 2 > 0.62**2)
    if name == "tee":
        return ((x.abs() < 0.8) & (y > 0.4) & (y < 0.8)) | ((x.abs() < 0.2) & (y > -0.8) & (y <= 0.4))
    raise KeyError(f"unknown subject {name!r}")


def _texture(texture: str, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """1 where the first ink colour goes, 0 where the second does (pixel coordinates of the big grid)."""
    s = _SUPERSAMPLE
    if texture == "solid":
        return torch.ones_like(px)
    if texture == "hstripes":
        return ((py // (3 * s)) % 2 == 0).float()
    if texture == "vstripes":
        return ((px // (3 * s)) % 2 == 0).float()
    if texture == "diagonal":
        return (((px + py) // (3 * s)) % 2 == 0).float()
    if texture == "dots":
        cx = (px % (5 * s)) - 2.5 * s + 0.5
        cy = (py % (5 * s)) - 2.5 * s + 0.5
        return (cx * cx + cy * cy > (1.6 * s) ** 2).float()
    if texture == "checker":
        return (((px // (4 * s)) + (py // (4 * s))) % 2 == 0).float()
    raise KeyError(f"unknown texture {texture!r}")


def render(
    subjects: list[str],
    styles: list[str],
    generator: torch.Generator | None = None,
    jitter: float = 1.0,
) -> torch.Tensor:
    """Draw one image per (subject, style) pair: float tensor [B, 3, 32, 32] in [0, 1].

    ``jitter`` scales the random position, size, rotation and colour variation (0 gives the canonical
    drawing, which tests use).
    """
    if len(subjects) != len(styles):
        raise ValueError("subjects and styles must have the same length")
    b = len(subjects)
    big = IMAGE_SIZE * _SUPERSAMPLE
    g = generator
    u = torch.rand(b, 6, generator=g) * 2 - 1  # shift x, shift y, scale, rotation, colour, texture phase
    shift = u[:, :2] * 0.12 * jitter
    scale = 0.72 * (1 + 0.12 * jitter * u[:, 2])
    angle = u[:, 3] * 0.15 * jitter
    coords = (torch.arange(big, dtype=torch.float32) + 0.5) / big * 2 - 1
    gy, gx = torch.meshgrid(-coords, coords, indexing="ij")  # y up
    gx = gx[None] - shift[:, 0, None, None]
    gy = gy[None] - shift[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    lx = (cos * gx + sin * gy) / scale[:, None, None]
    ly = (-sin * gx + cos * gy) / scale[:, None, None]
    phase = ((u[:, 5] + 1) * 3 * jitter).floor().long()
    py, px = torch.meshgrid(torch.arange(big), torch.arange(big), indexing="ij")

    images = torch.empty(b, 3, big, big)
    for i in range(b):
        style = _STYLE_BY_NAME[styles[i]]
        inside = _shape_mask(subjects[i], lx[i], ly[i])
        if style.outline:
            # a band of about 2.5 pixels inside the shape's edge
            k = 2 * _SUPERSAMPLE + 1
            eroded = -torch.nn.functional.max_pool2d(-inside.float()[None, None], kernel_size=k, stride=1, padding=k // 2)[0, 0]
            ink_mask = inside & (eroded < 0.5)
        else:
            ink_mask = inside
        tex = _texture(style.texture, px + phase[i], py + phase[i])
        tint = 1 + 0.06 * jitter * u[i, 4]
        ink = torch.tensor(style.ink)[:, None, None] * tex + torch.tensor(style.ink2)[:, None, None] * (1 - tex)
        paper = torch.tensor(style.paper)[:, None, None].expand(3, big, big)
        img = torch.where(ink_mask[None], ink, paper)
        images[i] = (img * tint).clamp(0, 1)
    return torch.nn.functional.avg_pool2d(images, _SUPERSAMPLE)


def random_batch(
    batch: int,
    generator: torch.Generator,
    subjects: tuple[str, ...] = BASE_SUBJECTS,
    styles: tuple[str, ...] | None = None,
) -> tuple[list[str], list[str], torch.Tensor]:
    """Random (subject, style) pairs and their drawings."""
    styles = styles or BASE_STYLE_NAMES
    si = torch.randint(len(subjects), (batch,), generator=generator).tolist()
    ti = torch.randint(len(styles), (batch,), generator=generator).tolist()
    subj = [subjects[i] for i in si]
    sty = [styles[i] for i in ti]
    return subj, sty, render(subj, sty, generator)
