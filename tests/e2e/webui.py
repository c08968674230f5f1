"""Start, talk to and stop a real WebUI (AUTOMATIC1111 or Forge) for the end-to-end suite.

Nothing here builds or installs a WebUI: it runs one the tester already has. The extension is linked into
that WebUI's ``extensions/`` folder as a user would clone it there (plus the test-only probe extension), and
both links are removed afterwards. Everything the run writes (settings file, cache, LoRAs, logs) lives in a
scratch folder, never in the WebUI's own config.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "probe"
EXTENSION_LINK = "sd-webui-ziplora"
PROBE_LINK = "ziplora-e2e-probe"
SDXL_KEY = "conditioner.embedders.1.model.ln_final.weight"  # A1111 sd_models_config: this key means SDXL base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def find_sdxl_checkpoint(webui_dir: Path) -> Path | None:
    """``ZIPLORA_E2E_CKPT``, else the first SDXL-base safetensors in the WebUI's models/Stable-diffusion."""
    from safetensors import safe_open

    explicit = os.environ.get("ZIPLORA_E2E_CKPT")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    folder = webui_dir / "models" / "Stable-diffusion"
    for path in sorted(folder.rglob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(path), "pt") as f:
                if SDXL_KEY in f.keys():
                    return path
        except Exception:  # noqa: BLE001 - not a readable checkpoint: look further
            continue
    return None


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash (modules/hashes.py addnet_hash_safetensors): sha256 of the bytes after the header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """Forge's LoRA hash (its modules/hashes.py sha256 hashes the whole file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def decode_image(b64: str) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB"))


def _link(target: Path, link: Path) -> bool:
    """Link ``target`` at ``link``; True when this run made the link (and must remove it)."""
    if link.is_symlink() and link.resolve() == target.resolve():
        return False
    if link.exists() or link.is_symlink():
        raise RuntimeError(f"{link} exists and is not a link to {target}; remove it or run against another WebUI")
    link.symlink_to(target, target_is_directory=True)
    return True


@dataclass
class WebUI:
    """One WebUI process: ``kind`` is "a1111" or "forge"."""

    kind: str
    root: Path
    python: str
    checkpoint: Path
    scratch: Path
    mode: str = "api"  # api: --nowebui; ui: the full web UI (for the browser test)
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    made_links: list[Path] = field(default_factory=list)
    started_at: float = 0.0
    ready_seconds: float = 0.0
    cpu: bool = False
    killed_for_memory: str = ""
    _rss_samples: list[tuple[float, int]] = field(default_factory=list)
    _sampler: threading.Thread | None = None
    _stop_sampling: threading.Event = field(default_factory=threading.Event)

    # -- configuration --------------------------------------------------------------------------------------
    @property
    def lora_dir(self) -> Path:
        return self.scratch / "Lora"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = [
            "launch.py",
            "--skip-prepare-environment",
            "--skip-version-check",
            "--no-download-sd-model",
            "--server-name", "127.0.0.1",
            "--port", str(self.port),
            "--api",
            "--ckpt", str(self.checkpoint),
            "--lora-dir", str(self.lora_dir),
            "--ui-settings-file", str(self.scratch / "config.json"),
            "--ui-config-file", str(self.scratch / "ui-config.json"),
            "--disable-nan-check",
        ]  # fmt: skip
        if self.mode == "api":
            args.append("--nowebui")
        if self.kind == "a1111":
            args.append("--do-not-download-clip")
            if self.cpu:
                args += ["--use-cpu", "all", "--no-half", "--precision", "full"]
        elif self.cpu:
            # Forge 2 ignores A1111's --use-cpu / --no-half; fp32 UNet storage plus a LoRA's backups exceed 24 GiB
            args += ["--always-cpu", "--unet-in-fp16"]
        return args + self.extra_args

    def settings(self) -> dict[str, Any]:
        # live previews would download vaeapprox-sdxl.pt on the first generation (modules/sd_vae_approx.py)
        settings: dict[str, Any] = {"live_previews_enable": False, "ziplora_resolution": 64, "ziplora_preview_steps": 2}
        if self.kind == "a1111" and self.cpu:
            # A1111's default Lora path backs up every weight the first time a LoRA is active (+13.6 GiB in fp32)
            settings["lora_functional"] = True
        return settings

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.lora_dir.mkdir(exist_ok=True)
        (self.scratch / "config.json").write_text(json.dumps(self.settings(), indent=1))
        extensions = self.root / "extensions"
        extensions.mkdir(exist_ok=True)
        for target, name in ((REPO, EXTENSION_LINK), (PROBE, PROBE_LINK)):
            if _link(target, extensions / name):
                self.made_links.append(extensions / name)
        self.port = self.port or free_port()
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            GRADIO_ANALYTICS_ENABLED="False",
            SD_WEBUI_CACHE_FILE=str(self.scratch / "cache.json"),
            PYTHONUNBUFFERED="1",
        )
        env.pop("PYTHONPATH", None)
        env.pop("COMMANDLINE_ARGS", None)
        command = [self.python, *self.args()]
        nice = os.environ.get("ZIPLORA_E2E_NICE", "19")
        if nice and shutil.which("nice"):
            command = ["nice", "-n", nice, *command]
        self.log_path = self.scratch / f"{self.kind}.log"
        log = open(self.log_path, "w")  # noqa: SIM115 - closed with the process
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the WebUI exited with {self.proc.returncode} during start-up; see {self.log_path}:\n{self.log_tail()}")
            try:
                # in UI mode the server answers before app_started has added the extensions' routes: 404 until then
                status, _ = self.request("GET", "/ziplora/v1/loras", timeout=5)
                if status == 200:
                    self.ready_seconds = time.monotonic() - self.started_at
                    return
            except (OSError, urllib.error.URLError, AssertionError):
                if self.proc.poll() is not None:
                    continue
            time.sleep(2)
        raise RuntimeError(f"the WebUI did not answer /ziplora/v1/loras within {timeout:.0f} s; see {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        self._stop_sampling.set()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        for link in self.made_links:
            if link.is_symlink():
                link.unlink()
        self.made_links.clear()

    # -- memory ------------------------------------------------------------------------------------------
    def _status(self, field_name: str) -> int:
        """A /proc/PID/status field in bytes (0 when unknown)."""
        if self.proc is None:
            return 0
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return 0
        return 0

    def rss(self) -> int:
        return self._status("VmRSS")

    def peak_rss(self) -> int:
        return self._status("VmHWM")

    def reset_peak(self) -> bool:
        """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
        if self.proc is None:
            return False
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def _sample_rss(self) -> None:
        """RSS every 2 s; the WebUI is killed when the machine's available memory falls below
        ``ZIPLORA_E2E_MIN_FREE_GIB`` (default 2), rather than letting it swap or take the machine down."""
        floor = float(os.environ.get("ZIPLORA_E2E_MIN_FREE_GIB", "2")) * 1024**3
        while not self._stop_sampling.wait(2.0):
            self._rss_samples.append((time.monotonic(), self.rss()))
            available = _mem_available()
            if available is not None and available < floor and self.proc is not None and self.proc.poll() is None:
                self.killed_for_memory = (
                    f"MemAvailable {available / 1024**3:.1f} GiB < {floor / 1024**3:.1f} GiB at RSS {self.rss() / 1024**3:.1f} GiB"
                )
                os.killpg(self.proc.pid, signal.SIGKILL)

    def max_rss_since(self, since: float) -> int:
        return max((r for t, r in self._rss_samples if t >= since), default=0)

    # -- HTTP --------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 600) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        except (OSError, urllib.error.URLError):
            if self.proc is not None:
                try:
                    self.proc.wait(10)  # a dropped connection: was the WebUI killed (e.g. by the memory floor)?
                except subprocess.TimeoutExpired:
                    pass
            self.check_alive()
            raise
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 600) -> Any:
        status, data = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise AssertionError(f"GET {path}: HTTP {status}: {data}")
        return data

    def post(self, path: str, body: Any, timeout: float = 600) -> tuple[int, Any]:
        return self.request("POST", path, body, timeout=timeout)

    def txt2img(self, prompt: str, seed: int, steps: int, size: int, timeout: float = 1800) -> dict[str, Any]:
        """One image through /sdapi/v1/txt2img: {"image": HxWx3 uint8, "infotext": str, "seconds": float}."""
        body = {
            "prompt": prompt,
            "negative_prompt": "",
            "seed": seed,
            "steps": steps,
            "width": size,
            "height": size,
            "sampler_name": "Euler",
            "cfg_scale": 5,
            "batch_size": 1,
            "n_iter": 1,
            "send_images": True,
            "save_images": False,
        }
        start = time.monotonic()
        status, data = self.post("/sdapi/v1/txt2img", body, timeout=timeout)
        self.check_alive()
        if status != 200:
            raise AssertionError(f"txt2img {prompt!r}: HTTP {status}: {str(data)[:500]}")
        info = json.loads(data["info"])
        return {"image": decode_image(data["images"][0]), "infotext": info["infotexts"][0], "seconds": time.monotonic() - start}

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            why = f" (killed by the suite: {self.killed_for_memory})" if self.killed_for_memory else ""
            raise AssertionError(f"the WebUI exited with {self.proc.returncode}{why}; see {self.log_path}:\n{self.log_tail()}")

    # -- the console ---------------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def python_for(root: Path, env_name: str) -> str:
    """The WebUI's interpreter: ``env_name`` if set, else its ``venv`` (as webui.sh makes it), else this one."""
    explicit = os.environ.get(env_name)
    if explicit:
        return explicit
    for candidate in (root / "venv" / "bin" / "python", root / "venv" / "Scripts" / "python.exe"):
        if candidate.exists():
            return str(candidate)
    return sys.executable
