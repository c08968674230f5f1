"""Background jobs: one at a time, progress while running, one-line errors, previews and rewrites."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import state_hash
from ziplora.errors import BusyError, InvalidRequestError
from ziplora.preview import PreviewSpec
from ziplora.request import MergeRequest
from ziplora.service import MergeService


def _request(**kw) -> MergeRequest:  # type: ignore[no-untyped-def]
    base = dict(content="subject", style="style", output_name="zipped", steps=8, sampling_steps=3, samples=1)
    base.update(kw)
    return MergeRequest(**base)  # type: ignore[arg-type]


def test_merge_job_reports_progress_and_a_summary(toy_host, lora_dir: Path) -> None:
    service = MergeService(toy_host)
    job = service.submit_merge(_request())
    with pytest.raises(BusyError):
        service.submit_merge(_request(output_name="second"))
    status = service.wait(job, 300)
    assert status.state == "done", status.error
    data = status.to_dict()
    assert data["result"]["tag"].startswith("<lora:zipped:1>")
    assert data["result"]["steps"] == 8 and len(data["losses"]) == 8
    assert (lora_dir / "zipped.safetensors").is_file()
    assert not (lora_dir / "second.safetensors").exists()
    assert toy_host.refreshed == [lora_dir / "zipped.safetensors"]
    rewritten = service.reexport(lora_dir / "zipped.safetensors", 0.4)
    assert rewritten["seconds"] < 30


def test_bad_requests_fail_before_any_thread_and_errors_are_one_line(toy_host, lora_dir: Path) -> None:
    service = MergeService(toy_host)
    with pytest.raises(InvalidRequestError, match="plain file name"):
        service.submit_merge(_request(output_name="../evil"))
    job = service.submit_merge(_request(content="missing"))
    status = service.wait(job, 60)
    assert status.state == "failed" and "no LoRA named 'missing'" in status.error and "\n" not in status.error


def test_preview_grid_has_four_rows_and_three_columns(toy_host, lora_dir: Path) -> None:
    service = MergeService(toy_host)
    before = state_hash(toy_host.model)
    service.wait(service.submit_merge(_request()), 300)
    spec = PreviewSpec(lora_dir / "subject.safetensors", lora_dir / "style.safetensors", lora_dir / "zipped.safetensors",
                       "a sks shape", "a shape in zwx style", "a sks shape in zwx style", seed=3)  # fmt: skip
    job = service.submit_preview(spec)
    status = service.wait(job, 300)
    assert status.state == "done", status.error
    grid = service.result(job)
    assert grid.cells.shape == (12, 3, 32, 32)
    assert grid.rows == ["subject LoRA alone", "style LoRA alone", "direct merge", "ZipLoRA"]
    assert grid.image.shape[2] == 3 and grid.image.shape[0] > 4 * 32
    # rows differ: the LoRAs do something; the model is untouched afterwards
    assert float((grid.cells[0] - grid.cells[3]).abs().mean()) > 1e-3
    assert state_hash(toy_host.model) == before


def test_the_summary_shows_the_hash_the_hosts_webui_writes_into_infotexts(toy_host, lora_dir: Path) -> None:
    """A1111 hashes the tensor data (the addnet hash); Forge hashes the whole file (ForgeHost.lora_hash)."""
    import hashlib

    from ziplora.hosts.forge import ForgeHost

    service = MergeService(toy_host)
    status = service.wait(service.submit_merge(_request()), 300)
    assert status.result["shorthash"] == status.result["sha256"][:12]  # the toy host: no hash of its own
    toy_host.lora_hash = lambda path: ForgeHost.lora_hash(None, path)  # type: ignore[attr-defined]
    status = service.wait(service.submit_merge(_request(output_name="again", seed=1)), 300)
    whole_file = hashlib.sha256((lora_dir / "again.safetensors").read_bytes()).hexdigest()
    assert status.result["shorthash"] == whole_file[:12] != status.result["sha256"][:12]


def test_reference_images_of_any_size_are_cropped_and_resized(toy_host, lora_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    paths = []
    for i, (w, h) in enumerate(((48, 30), (64, 64), (20, 90))):
        path = tmp_path / f"ref{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    service = MergeService(toy_host)
    req = _request(inputs="images", content_images=tuple(paths[:2]), style_images=(paths[2],), samples=2)
    status = service.wait(service.submit_merge(req), 300)
    assert status.state == "done", status.error
    assert (lora_dir / "zipped.safetensors").is_file()
