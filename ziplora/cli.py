"""``python -m ziplora``: inspect, merge (direct or ZipLoRA), reexport, demo, ui and bench.

Every expected failure prints one line on stderr and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ziplora.errors import ZipLoraError
from ziplora.request import MergeRequest, ReexportRequest
from ziplora.request.flags import add_flags, flag_values

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ziplora", description="Merge a subject LoRA and a style LoRA for SDXL with ZipLoRA.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    i = sub.add_parser("inspect", help="describe a LoRA file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.add_argument("--layers", action="store_true", help="list every layer")

    m = sub.add_parser("merge", help="merge a subject (content) LoRA and a style LoRA")
    add_flags(m, MergeRequest, files=("content", "style"))
    m.add_argument("--out", required=True, help="the output .safetensors path (its name is the output name)")
    m.add_argument("--host", default="toy", help="model to merge on (zip only): toy")
    m.add_argument("--json", action="store_true", help="print the result as JSON")

    r = sub.add_parser("reexport", help="rewrite a ZipLoRA output with a new style multiplier")
    add_flags(r, ReexportRequest, files=("name",))

    d = sub.add_parser("demo", help="the whole pipeline on the bundled toy model")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--subject", default=None, help="bundled subject LoRA name")
    d.add_argument("--style", default=None, help="bundled style LoRA name")
    d.add_argument("--steps", type=int, default=100)

    u = sub.add_parser("ui", help="the ZipLoRA tab alone on the toy model")
    u.add_argument("--port", type=int, default=7861)
    u.add_argument("--lora-dir", default=None, help="folder of LoRAs (default: a folder with the bundled ones)")

    b = sub.add_parser("bench", help="benchmarks")
    b.add_argument("which", choices=("quality",))
    b.add_argument("--json", action="store_true")
    b.add_argument("--quick", action="store_true", help="fewer pairs and images (a smoke run)")
    b.add_argument("--write-docs", action="store_true", help="write docs/quality.md")
    return p


def _inspect(args: argparse.Namespace) -> int:
    from ziplora.formats.lorafile import open_lora

    lora = open_lora(args.file)
    summary = lora.summary()
    layers = []
    for key in lora.keys:
        g = lora.groups[key]
        alpha_key = g.get("alpha")
        alpha = float(lora.st.read(alpha_key).float().reshape(-1)[0]) if alpha_key else lora.peft_alphas.get(key)
        layers.append({"layer": str(key), "kind": lora.layer_kind(key), "rank": lora.layer_rank(key), "alpha": alpha})
    if args.json:
        data = {
            "file": str(lora.path),
            "family": summary.family,
            "family_evidence": summary.family_evidence,
            "kinds": summary.kinds,
            "ranks": summary.ranks,
            "alphas": sorted({a["alpha"] for a in layers if a["alpha"] is not None}),
            "layers": {"unet": summary.unet_layers, "te1": summary.te1_layers, "te2": summary.te2_layers},
            "trigger_words": summary.trigger_words,
            "embeddings": summary.embeddings,
            "naming": summary.schemes,
            "sha256": lora.data_hash,
            "metadata": lora.metadata,
        }
        if args.layers:
            data["per_layer"] = layers
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    print(f"{lora.path.name}: {summary.one_line()}")
    print(f"  base model: {summary.family} ({summary.family_evidence})")
    print(f"  kinds: {', '.join(f'{k} x{n}' for k, n in sorted(summary.kinds.items()))}; ranks: {summary.rank_text}")
    alphas = sorted({a["alpha"] for a in layers if a["alpha"] is not None})
    print(f"  alphas: {', '.join(f'{a:g}' for a in alphas[:8]) or '-'}{' ...' if len(alphas) > 8 else ''}")
    print(f"  layers: UNet {summary.unet_layers}, text encoder 1 {summary.te1_layers}, text encoder 2 {summary.te2_layers}")
    print(f"  naming: {', '.join(summary.schemes)}; hash {lora.data_hash[:12]}")
    if summary.embeddings:
        print(f"  bundled embeddings: {', '.join(summary.embeddings)}")
    if lora.metadata:
        print(f"  metadata: {len(lora.metadata)} keys ({', '.join(sorted(lora.metadata)[:6])}{', ...' if len(lora.metadata) > 6 else ''})")
    if args.layers:
        for a in layers:
            shown = "-" if a["alpha"] is None else f"{a['alpha']:g}"
            print(f"  {a['layer']}: {a['kind']} rank {a['rank']} alpha {shown}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ziplora.jobs import run_merge
    from ziplora.progress import ConsoleProgress

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ZipLoraError(f"--out must end in .safetensors, got {out.name}")
    host = _host(args.host if args.method == "zip" else "files", out.parent)
    values = flag_values(args, MergeRequest)
    values.update(content=str(Path(args.content).resolve()), style=str(Path(args.style).resolve()), output_name=out.stem)
    request = MergeRequest(**values)
    progress = ConsoleProgress(quiet=args.json)
    try:
        outcome = run_merge(request, host, progress, output_dir=out.parent)
    finally:
        progress.close()
    report = outcome.export
    if args.json:
        data = {
            "path": str(outcome.path),
            "sha256": report.sha256,
            "tag": outcome.tag,
            "ranks": report.rank_counts(),
            "relative_error": report.relative_error,
            "timings": outcome.timings,
        }
        if outcome.zip is not None:
            z = outcome.zip
            data.update(steps=z.steps_run, stop_reason=z.stop_reason, initial_similarity=z.initial_similarity,
                        final_similarity=z.final_similarity, merger_movement=z.movement.__dict__)  # fmt: skip
        print(json.dumps(data, indent=2))
        return 0
    print(f"wrote {outcome.path} ({report.size_bytes / 2**20:.1f} MiB, {len(report.layers)} layers, hash {report.shorthash})")
    if report.relative_error:
        print(f"  SVD relative error {report.relative_error:.3g}")
    if outcome.zip is not None:
        z = outcome.zip
        print(
            f"  ZipLoRA: {z.steps_run} steps ({z.stop_reason}); mean |cos(m_c, m_s)| {z.initial_similarity:.3f} -> "
            f"{z.final_similarity:.3f}; mergers moved {z.movement.mean_abs_change:.3f} on average"
        )
    for note in outcome.notes:
        print(f"  note: {note}")
    print(f"  use: {outcome.tag}")
    return 0


def _host(name: str, folder: Path):  # type: ignore[no-untyped-def]
    if name == "toy":
        from ziplora.hosts.toy import ToyHost

        return ToyHost(folder)
    if name == "files":
        from ziplora.hosts.base import FilesHost

        return FilesHost(folder)
    raise ZipLoraError(f"unknown host {name!r}: from the command line only 'toy' is available (A1111 and Forge run in the WebUI)")


def _reexport(args: argparse.Namespace) -> int:
    from ziplora.jobs import reexport

    request = ReexportRequest(**flag_values(args, ReexportRequest)).validated()
    report = reexport(None, Path(request.name), request.style_multiplier)
    print(f"rewrote {report.path} with style multiplier {request.style_multiplier:g} in {report.seconds:.2f} s (hash {report.shorthash})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "reexport":
            return _reexport(args)
        if args.command == "demo":
            from ziplora.toy.demo import run_demo

            return run_demo(Path(args.out), args.subject, args.style, args.steps)
        if args.command == "ui":
            from ziplora.ui import launch_standalone

            return launch_standalone(args.port, args.lora_dir)
        if args.command == "bench":
            from ziplora.toy.quality import main as quality_main

            return quality_main(json_output=args.json, quick=args.quick, write_docs=args.write_docs)
    except ZipLoraError as err:
        if args.debug:
            raise
        sys.stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; nothing was written\n")
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if args.debug:
            raise
        sys.stderr.write(f"internal error: {type(err).__name__}: {' '.join(str(err).split())} (run with --debug for details)\n")
        return 1
    return 0
