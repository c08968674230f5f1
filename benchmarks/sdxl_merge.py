"""A whole ZipLoRA merge at SDXL scale: speed and memory, through the same code the WebUI hosts run.

Builds the SDXL-base UNet from the toy world's sgm-shaped classes at full size with random weights (no
other model library), two random rank-64 kohya LoRAs on the 722 attention-block Linears, and runs
``ziplora.jobs.run_merge`` (data-free inputs -> 100 steps -> export) on a host whose text encoders are
stand-ins (random but fixed conditioning per prompt: the text encoders are not what is being timed).

Prints, from one run: the floor (the plain UNet forward + backward with respect to its input, batch 2,
best of N), the merge step (median), their ratio, input generation, export, total and peak memory, for
each configuration asked for (resolution x gradient checkpointing x precision).

    python benchmarks/sdxl_merge.py                      # on a GPU: 1024 and 768, ckpt on/off, fp16 + bf16
    python benchmarks/sdxl_merge.py --smoke              # on a CPU: a small UNet, a few steps (CI)
    python benchmarks/sdxl_merge.py --json out.json ...  # also write the figures as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ziplora.architecture.sgm_unet import UNetConfig, UNetModel  # noqa: E402
from ziplora.architecture.toyxl import UNET_CONFIG as SMOKE_CONFIG  # noqa: E402  (the toy UNet: SDXL's layout, small)
from ziplora.formats.families import Family  # noqa: E402
from ziplora.hosts.base import ExportDefaults, SessionOptions, iter_blocks, list_lora_files, resolve_in_roots  # noqa: E402
from ziplora.jobs import run_merge  # noqa: E402
from ziplora.progress import Progress, StepRecord  # noqa: E402
from ziplora.request import MergeRequest  # noqa: E402
from ziplora.schedule import NoiseSchedule  # noqa: E402
from ziplora.synthetic import attention_layers, write_random_lora  # noqa: E402


def random_unet(config: UNetConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> UNetModel:
    """Random weights everywhere, the zero-initialised output layers included (so LoRAs change the output)."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNetModel(config)
    unet = unet.to(dtype).eval().requires_grad_(False)
    return unet


class RandomSDXLSession:
    """ModelSession over a random-weight UNet; conditioning is a fixed random tensor per prompt."""

    text_encoder_grad = False
    default_guidance = 5.0

    def __init__(self, unet: UNetModel, device: torch.device, dtype: torch.dtype) -> None:
        self.unet, self.device, self.dtype = unet, device, dtype
        self.schedule = NoiseSchedule.scaled_linear()
        self.roots = {"unet": unet}
        self.default_resolution = 1024
        self.context_dim = unet.config.context_dim
        self.adm = unet.config.adm_in_channels

    def resolve(self, key):  # type: ignore[no-untyped-def]
        return resolve_in_roots(self.roots, key)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
            rows.append((torch.randn(77, self.context_dim, generator=g), torch.randn(self.adm, generator=g)))
        return {
            "crossattn": torch.stack([r[0] for r in rows]).to(self.device, self.dtype),
            "vector": torch.stack([r[1] for r in rows]).to(self.device, self.dtype),
        }

    def encode_negative(self, n: int) -> dict[str, torch.Tensor]:
        return {
            "crossattn": torch.zeros(n, 77, self.context_dim, device=self.device, dtype=self.dtype),
            "vector": torch.zeros(n, self.adm, device=self.device, dtype=self.dtype),
        }

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.unet(x_t.to(self.dtype), t, cond["crossattn"], cond["vector"])

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        return (self.unet.config.in_channels, height // 8, width // 8)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[:, :3].float().clamp(-1, 1) * 0.5 + 0.5

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def checkpoint_blocks(self) -> list[torch.nn.Module]:
        return list(iter_blocks(self.unet))


class BenchHost:
    name = "bench"
    export_defaults = ExportDefaults()

    def __init__(self, folder: Path, session: RandomSDXLSession, family: Family) -> None:
        self.folder, self._session = folder, session
        self.families = (family,)

    def lora_dir(self) -> Path:
        return self.folder

    def list_loras(self) -> list[Path]:
        return list_lora_files(self.folder)

    @contextlib.contextmanager
    def session(self, options: SessionOptions, progress: Progress) -> Iterator[RandomSDXLSession]:
        yield self._session

    def after_write(self, path: Path) -> None:
        pass

    def job(self, progress: Progress):  # type: ignore[no-untyped-def]
        return contextlib.nullcontext()


class TimedProgress(Progress):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.step_times: list[float] = []
        self._last: float | None = None

    def begin_stage(self, stage: str, total: int) -> None:
        super().begin_stage(stage, total)
        self._last = time.perf_counter()

    def record(self, rec: StepRecord) -> None:
        super().record(rec)  # the loop has synchronised already (it read the losses)
        now = time.perf_counter()
        if self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_seconds(unet: UNetModel, device: torch.device, dtype: torch.dtype, res: int, checkpoint: bool, repeats: int) -> float:
    """The plain UNet forward + backward w.r.t. its input, batch 2: what a ZipLoRA step cannot beat."""
    from ziplora.merge.checkpointing import checkpointed

    lat = res // 8
    x = torch.randn(2, unet.config.in_channels, lat, lat, device=device, dtype=dtype, requires_grad=True)
    t = torch.tensor([500, 700], device=device)
    ctx = torch.randn(2, 77, unet.config.context_dim, device=device, dtype=dtype)
    y = torch.randn(2, unet.config.adm_in_channels, device=device, dtype=dtype)
    best = float("inf")
    with checkpointed(list(iter_blocks(unet)), checkpoint):
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            unet(x, t, ctx, y).float().square().mean().backward()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
            x.grad = None
    return best


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_one(unet, session, folder, family, device, dtype, res, checkpoint, steps, samples, sampling_steps, repeats):  # type: ignore[no-untyped-def]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    floor = floor_seconds(unet, device, dtype, res, checkpoint, repeats)
    host = BenchHost(folder, session, family)
    progress = TimedProgress(device)
    request = MergeRequest(
        "content", "style", f"bench-{res}-{'ckpt' if checkpoint else 'nockpt'}-{str(dtype)[6:]}", steps=steps,
        stop_similarity=0.0, resolution=res, samples=samples, sampling_steps=sampling_steps, gradient_checkpointing=checkpoint,
        overwrite=True, content_prompt="a photo of sks dog", style_prompt="a painting in zwx style",
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    outcome = run_merge(request, host, progress)
    total = time.perf_counter() - t0
    steady = progress.step_times[4:] or progress.step_times
    step = statistics.median(steady)
    z = outcome.zip
    return {
        "resolution": res,
        "checkpointing": checkpoint,
        "dtype": str(dtype).replace("torch.", ""),
        "floor_s": floor,
        "step_s": step,
        "step_over_floor": step / floor,
        "inputs_s": outcome.timings.get("inputs"),
        "optimise_s": outcome.timings.get("optimise"),
        "export_s": outcome.timings.get("export"),
        "total_s": total,
        "peak_gib": peak_memory(device),
        "step_mode": z.step_mode if z else None,
        "forms": z.forms if z else None,
        "steps": z.steps_run if z else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small UNet, few steps: a CPU smoke test")
    ap.add_argument("--resolutions", default=None, help="comma list (default 1024,768; smoke: 64)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp16,bf16,fp32 (default fp16,bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--checkpointing", default="on,off")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5, help="floor: best of N")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    config = SMOKE_CONFIG if args.smoke else UNetConfig.sdxl_base()
    resolutions = [int(r) for r in (args.resolutions or ("128" if args.smoke else "1024,768")).split(",")]
    names = (args.dtypes or ("fp32" if device.type == "cpu" else "fp16,bf16")).split(",")
    dtypes = [{"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[n] for n in names]
    ckpts = [c == "on" for c in args.checkpointing.split(",")]
    steps = args.steps or (4 if args.smoke else 100)
    rank = args.rank or (4 if args.smoke else 64)
    folder = Path(tempfile.mkdtemp(prefix="ziplora-sdxl-bench-"))
    family = Family.TOYXL if args.smoke else Family.SDXL
    keys = attention_layers(family)
    for name, seed in (("content", 1), ("style", 2)):
        write_random_lora(folder / f"{name}.safetensors", keys, family, rank=rank, seed=seed, scale=0.05)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; UNet {'smoke' if args.smoke else 'SDXL-base'} "
          f"({sum(p.numel() for p in UNetModel(config).parameters()) / 1e6:.0f} M params, random); LoRAs rank {rank} on {len(keys)} layers")  # fmt: skip
    rows = []
    for dtype in dtypes:
        unet = random_unet(config, device, dtype)
        session = RandomSDXLSession(unet, device, dtype)
        for res in resolutions:
            for ckpt in ckpts:
                row = run_one(
                    unet,
                    session,
                    folder,
                    family,
                    device,
                    dtype,
                    res,
                    ckpt,
                    steps,
                    1 if args.smoke else 2,
                    2 if args.smoke else 20,
                    args.repeats,
                )
                rows.append(row)
                print(
                    f"{res}px {row['dtype']} ckpt={'on ' if ckpt else 'off'}: floor {row['floor_s'] * 1000:.0f} ms, "
                    f"step {row['step_s'] * 1000:.0f} ms ({row['step_over_floor']:.2f}x floor, {row['step_mode']}), "
                    f"inputs {row['inputs_s']:.1f} s, export {row['export_s']:.1f} s, total {row['total_s']:.1f} s, "
                    f"peak {row['peak_gib']:.2f} GiB"
                )
        del unet, session
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
