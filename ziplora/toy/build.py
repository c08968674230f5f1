"""``python -m ziplora.toy build``: rebuild every bundled toy asset, seeded and reproducible.

1. the ToyXL base model on the base subjects and styles;
2. three subject LoRAs (5 images of one novel subject each, DreamBooth with a rare token, text encoders too)
   and three style LoRAs (1 image of one novel style each, UNet only);
3. the subject and style scorers, with their held-out accuracy;
4. how often the scorers recognise the base model's own samples;
and writes manifest.json with every figure and the time each stage took.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ziplora.toy import world
from ziplora.toy.catalog import ALL_LORAS, ToyLora
from ziplora.toy.scorers import Scorers, ScorerTrainConfig, evaluate_scorer, save_scorers, train_scorer
from ziplora.toy.train_base import BaseTrainConfig, train_base
from ziplora.toy.train_lora import LoraTrainConfig, save_kohya_lora, train_lora

log = logging.getLogger(__name__)

__all__ = ["main", "build_loras", "evaluate_base"]


def lora_training_data(spec: ToyLora, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The images (and captions) the build trains ``spec`` on, for the build's ``seed``."""
    g = torch.Generator().manual_seed(seed + 100 + ALL_LORAS.index(spec))
    if spec.kind == "subject":
        images = world.render([spec.concept] * len(spec.base_styles), list(spec.base_styles), g)
        return images, [spec.prompt] * len(spec.base_styles)
    images = world.render([spec.base_subject], [spec.concept], g)
    return images, [f"a {spec.base_subject} in {spec.identifier} style"]


def build_loras(model, out_dir: Path, steps: int, seed: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    for i, spec in enumerate(ALL_LORAS):
        t0 = time.time()
        images, prompts = lora_training_data(spec, seed)
        cfg = LoraTrainConfig(rank=8, alpha=8.0, steps=steps, text_encoder=spec.kind == "subject", seed=seed + i)
        factors = train_lora(model, images, prompts, cfg)
        description = (
            f"Toy {spec.kind} LoRA: the novel {spec.kind} '{spec.concept}' behind '{spec.identifier}', "
            f"trained on {len(images)} image(s) ({'DreamBooth' if spec.kind == 'subject' else 'one image of the style'})."
        )
        save_kohya_lora(
            out_dir / f"{spec.name}.safetensors", factors, cfg, spec.trigger, f"{len(images)}_{spec.trigger}", description, len(images)
        )
        figures[spec.name] = {"kind": spec.kind, "concept": spec.concept, "identifier": spec.identifier,
                              "images": len(images), "steps": steps, "seconds": round(time.time() - t0, 1)}  # fmt: skip
        log.info("LoRA %s done in %.0f s", spec.name, time.time() - t0)
    return figures


@torch.no_grad()
def evaluate_base(model, scorers: Scorers, per_pair: int = 4, seed: int = 777) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Sample every base (subject, style) pair and ask the scorers what they see."""
    subjects, styles = [], []
    for s in world.BASE_SUBJECTS:
        for t in world.BASE_STYLE_NAMES:
            subjects += [s] * per_pair
            styles += [t] * per_pair
    prompts = [f"a {s} in {t} style" for s, t in zip(subjects, styles)]
    images = torch.cat([model.generate(prompts[i : i + 64], seed=seed + i) for i in range(0, len(prompts), 64)])
    ps = scorers.subject.probabilities(images).argmax(-1).tolist()
    pt = scorers.style.probabilities(images).argmax(-1).tolist()
    subj_ok = [scorers.subject.classes[p] == s for p, s in zip(ps, subjects)]
    style_ok = [scorers.style.classes[p] == t for p, t in zip(pt, styles)]
    n = len(prompts)
    return {
        "samples": n,
        "subject_right": sum(subj_ok) / n,
        "style_right": sum(style_ok) / n,
        "both_right": sum(a and b for a, b in zip(subj_ok, style_ok)) / n,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ziplora.toy build", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("build",))
    ap.add_argument("--out", default=None, help="asset folder (default: the package's ziplora/toy/assets)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-steps", type=int, default=BaseTrainConfig().steps)
    ap.add_argument("--base-checkpoint", default=None, help="resume the base model's training from this file")
    ap.add_argument("--reuse-base", action="store_true", help="keep the base model already in --out")
    ap.add_argument("--lora-steps", type=int, default=400)
    ap.add_argument("--scorer-steps", type=int, default=ScorerTrainConfig().steps)
    ap.add_argument("--reuse-scorers", action="store_true", help="keep the scorers already in --out (they are re-evaluated)")
    ap.add_argument("--base-note", default="", help="how the base model was trained, when --reuse-base keeps it")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole build (minutes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from ziplora.toy.assets import ASSETS

    out = Path(args.out) if args.out else ASSETS
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.base_steps, args.lora_steps, args.scorer_steps = 20, 10, 20
    timings: dict[str, float] = {}
    t_all = time.time()

    from safetensors.torch import save_file

    from ziplora.toy.pipeline import ToyXL

    t0 = time.time()
    base_path = out / "base.safetensors"
    if args.reuse_base and base_path.is_file():
        model = ToyXL.load(base_path)
    else:
        cfg = BaseTrainConfig(steps=args.base_steps, seed=args.seed, pool=2048 if args.quick else BaseTrainConfig().pool)
        checkpoint = Path(args.base_checkpoint) if args.base_checkpoint else None
        model = train_base(cfg, checkpoint)
        save_file(model.state_for_save(), str(base_path), metadata={"ziplora_toy": "base", "steps": str(cfg.steps), "seed": str(cfg.seed)})
        model = ToyXL.load(base_path)  # what users get: the fp16 file
    timings["base_model"] = time.time() - t0

    t0 = time.time()
    loras = build_loras(model, out / "loras", args.lora_steps, args.seed)
    timings["loras"] = time.time() - t0

    t0 = time.time()
    if args.reuse_scorers and (out / "scorers.safetensors").is_file():
        from ziplora.toy.scorers import load_scorers

        scorers = load_scorers(out / "scorers.safetensors")
    else:
        scfg = ScorerTrainConfig(steps=args.scorer_steps, seed=args.seed, pool=1024 if args.quick else ScorerTrainConfig().pool)
        scorers = Scorers(train_scorer("subject", scfg), train_scorer("style", scfg))
        save_scorers(out / "scorers.safetensors", scorers)
    accuracy = {
        "subject_heldout": evaluate_scorer(scorers.subject, "subject", 200 if args.quick else 2000),
        "style_heldout": evaluate_scorer(scorers.style, "style", 200 if args.quick else 2000),
        "subject_heldout_augmented": evaluate_scorer(scorers.subject, "subject", 200 if args.quick else 2000, augmented=True),
        "style_heldout_augmented": evaluate_scorer(scorers.style, "style", 200 if args.quick else 2000, augmented=True),
    }
    timings["scorers"] = time.time() - t0

    t0 = time.time()
    base_eval = evaluate_base(model, scorers, per_pair=1 if args.quick else 4)
    timings["evaluate_base"] = time.time() - t0
    timings["total"] = time.time() - t_all

    manifest = {
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python -m ziplora.toy", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "device": "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "seed": args.seed,
        "base_steps": args.base_steps,
        "base_note": args.base_note,
        "loras": loras,
        "scorer_accuracy": accuracy,
        "base_model_recognised": base_eval,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "files": {p.name: p.stat().st_size for p in sorted(out.rglob("*.safetensors"))},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"scorer_accuracy": accuracy, "base_model_recognised": base_eval, "seconds": manifest["seconds"]}, indent=2))
    return 0
