"""Two small classifiers that judge toy images: which subject (shape) and which style (rendering).

They are trained on rendered images of every subject and style, the novel ones included, with noise,
blur and colour jitter so they also read the imperfect samples a diffusion model draws.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ziplora.toy import world

log = logging.getLogger(__name__)

__all__ = ["Scorer", "Scorers", "train_scorer", "evaluate_scorer", "augment", "ScorerTrainConfig"]


class Scorer(nn.Module):
    """A small CNN: 32x32 RGB in [0, 1] -> class logits."""

    def __init__(self, classes: tuple[str, ...]) -> None:
        super().__init__()
        self.classes = classes
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 96, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(96 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, len(classes)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2 - 1))

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        self.eval()
        return F.softmax(self(images.float()), dim=-1)

    def index(self, name: str) -> int:
        return self.classes.index(name)


@dataclass
class Scorers:
    subject: Scorer
    style: Scorer


@dataclass(frozen=True)
class ScorerTrainConfig:
    steps: int = 800
    batch: int = 128
    lr: float = 2e-3
    pool: int = 12000  # drawings rendered once, then augmented afresh at every step
    seed: int = 0


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise, blur and colour jitter of the strength diffusion samples show."""
    b = images.shape[0]
    out = images
    blur = torch.rand(b, generator=generator) < 0.3
    if blur.any():
        kernel = torch.tensor([0.25, 0.5, 0.25])
        k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        out = torch.where(blur[:, None, None, None], F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), k2, groups=3), out)
    gain = 1 + 0.15 * (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1)
    bias = 0.06 * (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1)
    sigma = torch.rand(b, 1, 1, 1, generator=generator) * 0.12
    noise = torch.randn(out.shape, generator=generator) * sigma
    return (out * gain + bias + noise).clamp(0, 1)


def _batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], list[str]]:
    si = torch.randint(len(world.ALL_SUBJECTS), (n,), generator=generator).tolist()
    ti = torch.randint(len(world.ALL_STYLE_NAMES), (n,), generator=generator).tolist()
    subjects = [world.ALL_SUBJECTS[i] for i in si]
    styles = [world.ALL_STYLE_NAMES[i] for i in ti]
    return world.render(subjects, styles, generator), subjects, styles


def train_scorer(kind: str, cfg: ScorerTrainConfig) -> Scorer:
    """``kind`` is "subject" or "style"."""
    classes = world.ALL_SUBJECTS if kind == "subject" else world.ALL_STYLE_NAMES
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + (0 if kind == "subject" else 1))
    model = Scorer(classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    t0 = time.time()
    pool, pool_subjects, pool_styles = _batch(cfg.pool, gen)
    pool_labels = torch.tensor([classes.index(x) for x in (pool_subjects if kind == "subject" else pool_styles)])
    model.train()
    for step in range(cfg.steps):
        lr = cfg.lr * 0.5 * (1 + torch.cos(torch.tensor(step / cfg.steps * torch.pi))).item()
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(cfg.pool, (cfg.batch,), generator=gen)
        loss = F.cross_entropy(model(augment(pool[idx], gen)), pool_labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0:
            log.info("%s scorer step %d/%d loss %.4f (%.0f s)", kind, step + 1, cfg.steps, float(loss.detach()), time.time() - t0)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def evaluate_scorer(model: Scorer, kind: str, n: int = 2000, seed: int = 12345, augmented: bool = False) -> float:
    """Accuracy on freshly drawn held-out images (a seed never used in training)."""
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for start in range(0, n, 250):
        images, subjects, styles = _batch(min(250, n - start), gen)
        if augmented:
            images = augment(images, gen)
        truth = subjects if kind == "subject" else styles
        pred = model.probabilities(images).argmax(-1).tolist()
        correct += sum(model.classes[p] == t for p, t in zip(pred, truth))
    return correct / n


def save_scorers(path, scorers: Scorers) -> None:  # type: ignore[no-untyped-def]
    from ziplora.formats.safetensors_io import write_safetensors

    tensors = {}
    for kind, model in (("subject", scorers.subject), ("style", scorers.style)):
        for k, v in model.state_dict().items():
            tensors[f"{kind}.{k}"] = v.detach().to(torch.float16).contiguous()
    meta = {"subject_classes": ",".join(scorers.subject.classes), "style_classes": ",".join(scorers.style.classes)}
    write_safetensors(path, tensors, meta, overwrite=True)


def load_scorers(path) -> Scorers:  # type: ignore[no-untyped-def]
    from ziplora.formats.safetensors_io import SafetensorsFile

    st = SafetensorsFile(path)
    models = {}
    for kind in ("subject", "style"):
        classes = tuple(st.metadata[f"{kind}_classes"].split(","))
        model = Scorer(classes)
        state = {k[len(kind) + 1 :]: st.read(k).float() for k in st.tensors if k.startswith(kind + ".")}
        model.load_state_dict(state)
        models[kind] = model.eval().requires_grad_(False)
    return Scorers(models["subject"], models["style"])
