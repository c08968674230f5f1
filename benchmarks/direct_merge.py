"""Direct merge of two rank-64 kohya SDXL LoRAs over all 722 attention-block Linears (fp16, ~325 MiB each).

Target (issue 2): <= 10 s wall and <= 3 GB peak RSS on a 2-core CPU. Prints the figures; the merge runs in a
child process so its peak RSS is its own. The reference in the same run is a plain copy of both input files
(read + write of the same bytes), so the timing can be read as a ratio on a noisy shared machine.

    python benchmarks/direct_merge.py [--rank 64] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _child(content: str, style: str, out: str) -> None:
    from ziplora.export import ExportOptions, export_merge
    from ziplora.formats import Family, open_lora
    from ziplora.metadata import Provenance

    t0 = time.perf_counter()
    c = open_lora(content, expect=Family.SDXL)
    s = open_lora(style, expect=Family.SDXL)
    report = export_merge(c, s, Path(out), ExportOptions(overwrite=True), Provenance("direct"))
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall": wall, "peak_rss_mib": peak_kib / 1024, "layers": len(report.layers), "size": report.size_bytes}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", default=None, help="folder for the test files (default: a temporary one)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    import torch

    from ziplora.formats import Family
    from ziplora.synthetic import attention_layers, write_random_lora

    torch.set_num_threads(2)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ziplora-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    keys = attention_layers(Family.SDXL)
    content, style, out = folder / "content.safetensors", folder / "style.safetensors", folder / "merged.safetensors"
    t0 = time.perf_counter()
    for path, seed in ((content, 1), (style, 2)):
        if not path.exists():
            write_random_lora(path, keys, Family.SDXL, rank=args.rank, seed=seed)
    print(f"inputs: 2 x {content.stat().st_size / 2**20:.0f} MiB, {len(keys)} layers, rank {args.rank} "
          f"(made in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    rows = []
    for i in range(args.repeat):
        t = time.perf_counter()
        for src in (content, style):
            shutil.copyfile(src, folder / f"copy_{src.name}")
        copy_wall = time.perf_counter() - t
        res = subprocess.run(
            [sys.executable, __file__, "--child", str(content), str(style), str(out)], capture_output=True, text=True, check=True
        )
        data = json.loads(res.stdout.strip().splitlines()[-1])
        data["copy"] = copy_wall
        rows.append(data)
        print(f"run {i + 1}: merge {data['wall']:.2f} s, peak RSS {data['peak_rss_mib']:.0f} MiB, "
              f"output {data['size'] / 2**20:.0f} MiB, {data['layers']} layers; file copy reference {copy_wall:.2f} s "
              f"(ratio {data['wall'] / copy_wall:.1f}x)")  # fmt: skip
    best = min(rows, key=lambda r: r["wall"])
    print(f"best: {best['wall']:.2f} s wall (target <= 10 s), peak RSS {max(r['peak_rss_mib'] for r in rows):.0f} MiB "
          f"(target <= 3072 MiB); {best['wall'] / best['copy']:.1f}x the time to copy both inputs")  # fmt: skip
    if not args.keep:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
