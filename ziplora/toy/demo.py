"""``python -m ziplora demo``: the whole pipeline on the bundled toy model, in about half a minute on 2 CPU cores.

Merges a bundled subject LoRA and style LoRA with ZipLoRA (data-free inputs) and directly, renders the A/B
grid, scores every cell with the bundled scorers and writes report.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ziplora.images import make_grid, save_png, to_uint8, upscale_nearest
from ziplora.jobs import run_merge
from ziplora.progress import ConsoleProgress
from ziplora.request import MergeRequest

__all__ = ["run_demo"]

ROWS = ("subject LoRA alone", "style LoRA alone", "direct merge", "ZipLoRA")
COLUMNS = ("subject in style", "subject alone", "style alone")
DEFAULT_SUBJECT, DEFAULT_STYLE = "crescent_ohwx", "cocoa_kqr"  # the pair where the merges work; docs/quality.md has all
SEEDS = list(range(1000, 1016))  # 16 fixed seeds per cell for the scores; the grid shows the first 4


def run_demo(out: Path, subject: str | None = None, style: str | None = None, steps: int = 100) -> int:
    t_start = time.perf_counter()
    from ziplora.errors import InvalidRequestError
    from ziplora.hosts.toy import ToyHost
    from ziplora.toy.assets import LORA_DIR, load_scorers
    from ziplora.toy.catalog import STYLE_LORAS, SUBJECT_LORAS, both_prompt
    from ziplora.toy.evaluate import render_stack, score_images

    subjects, styles = {s.name: s for s in SUBJECT_LORAS}, {s.name: s for s in STYLE_LORAS}
    subject, style = subject or DEFAULT_SUBJECT, style or DEFAULT_STYLE
    if subject not in subjects or style not in styles:
        raise InvalidRequestError(f"--subject must name a bundled subject LoRA ({', '.join(subjects)}) "
                                  f"and --style a bundled style LoRA ({', '.join(styles)})")  # fmt: skip
    subj, sty = subjects[subject], styles[style]
    out.mkdir(parents=True, exist_ok=True)
    host = ToyHost(LORA_DIR)
    scorers = load_scorers()
    progress = ConsoleProgress()
    zipped = run_merge(
        MergeRequest(subj.name, sty.name, "zipped", steps=steps, overwrite=True, content_prompt=subj.prompt, style_prompt=sty.prompt),
        host, progress, output_dir=out,
    )  # fmt: skip
    progress.close()
    direct = run_merge(MergeRequest(subj.name, sty.name, "direct", method="direct", overwrite=True), host, progress, output_dir=out)
    progress.close()

    prompts = [both_prompt(subj, sty), subj.prompt, sty.prompt]
    wanted = [(subj.concept, sty.concept), (subj.concept, None), (None, sty.concept)]
    stacks = [
        [(LORA_DIR / f"{subj.name}.safetensors", 1.0)],
        [(LORA_DIR / f"{sty.name}.safetensors", 1.0)],
        [(direct.path, 1.0)],
        [(zipped.path, 1.0)],
    ]
    t_render = time.perf_counter()
    scores: dict[str, dict[str, dict]] = {}
    tiles = []
    for row, stack in zip(ROWS, stacks):
        images = render_stack(host, stack, prompts, SEEDS).reshape(len(prompts), len(SEEDS), 3, 32, 32)
        scores[row] = {}
        for col, imgs, (s, t) in zip(COLUMNS, images, wanted):
            scores[row][col] = score_images(imgs, scorers, s, t).as_dict()
            cell = to_uint8(imgs[:4])
            tiles.append(make_grid(np.stack([upscale_nearest(c, 3) for c in cell]), 2, 2, pad=1, fill=255))
    render_seconds = time.perf_counter() - t_render
    grid = make_grid(np.stack(tiles), len(ROWS), len(COLUMNS), pad=8, fill=255)
    save_png(grid, out / "grid.png")

    z = zipped.zip
    assert z is not None
    report = {
        "subject_lora": subj.name,
        "style_lora": sty.name,
        "subject": subj.concept,
        "style": sty.concept,
        "prompts": dict(zip(COLUMNS, prompts)),
        "rows": list(ROWS),
        "columns": list(COLUMNS),
        "seeds": SEEDS,
        "scores": scores,
        "ziplora": {
            "steps": z.steps_run,
            "stop_reason": z.stop_reason,
            "similarity_before": z.initial_similarity,
            "similarity_after": z.final_similarity,
            "merger_movement": z.movement.__dict__,
            "forms": z.forms,
        },
        "files": {"zipped": str(zipped.path), "direct": str(direct.path), "grid": str(out / "grid.png")},
        "tag": zipped.tag,
        "seconds": {
            "ziplora_merge": round(zipped.timings.get("total", 0.0), 2),
            "direct_merge": round(direct.timings.get("total", 0.0), 2),
            "render_and_score": round(render_seconds, 2),
            "total": round(time.perf_counter() - t_start, 2),
        },
        "threads": torch.get_num_threads(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _print_table(report)
    return 0


def _pct(x: float | None) -> str:
    return "  - " if x is None else f"{100 * x:3.0f}%"


def _print_table(report: dict) -> None:
    print(f"ZipLoRA demo: subject '{report['subject']}' ({report['subject_lora']}) x style '{report['style']}' ({report['style_lora']})")
    print(f"{'share of images right (subject / style)':<26}" + "".join(f"{c:>22}" for c in report["columns"]))
    for row in report["rows"]:
        cells = []
        for col in report["columns"]:
            s = report["scores"][row][col]
            cells.append(f"{_pct(s['subject_right'])} / {_pct(s['style_right'])}")
        print(f"{row:<26}" + "".join(f"{c:>22}" for c in cells))
    z = report["ziplora"]
    print(f"ZipLoRA: {z['steps']} steps, mean |cos(m_c, m_s)| {z['similarity_before']:.3f} -> {z['similarity_after']:.3f}, "
          f"mergers moved {z['merger_movement']['mean_abs_change_content']:.3f} (subject) / "
          f"{z['merger_movement']['mean_abs_change_style']:.3f} (style) on average")  # fmt: skip
    print(
        f"wrote {report['files']['zipped']}, {report['files']['direct']}, {report['files']['grid']} in {report['seconds']['total']:.1f} s"
    )
    print(f"grid.png: rows {', '.join(report['rows'])}; columns {', '.join(report['columns'])}; 4 seeds per cell")
    print(f"use: {report['tag']}")
