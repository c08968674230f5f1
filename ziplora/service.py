"""Jobs in the background, one at a time: what the tab and the API route share.

A merge (or preview) runs in a worker thread inside ``host.job(progress)`` (the WebUI's queue lock and
progress bar); callers poll ``status(job_id)``. A second job while one runs is refused with ``BusyError``,
never interleaved.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ziplora.errors import BusyError, JobInterrupted, ZipLoraError
from ziplora.hosts.base import Host
from ziplora.jobs import MergeOutcome, reexport, run_merge
from ziplora.preview import PreviewGrid, PreviewSpec, assemble_grid, preview_prompts, preview_rows
from ziplora.progress import Progress, ProgressState
from ziplora.request import MergeRequest

log = logging.getLogger(__name__)

__all__ = ["JobStatus", "MergeService", "outcome_summary"]


@dataclass
class JobStatus:
    id: str
    kind: str  # merge | preview
    state: str  # running | done | failed | interrupted
    progress: ProgressState
    error: str | None = None
    result: dict[str, Any] | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        p = self.progress
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "stage": p.stage,
            "step": p.done,
            "steps": p.total,
            "text": p.text,
            "eta_seconds": p.eta_seconds,
            "losses": [r.__dict__ for r in p.records],
            "error": self.error,
            "result": self.result,
        }


def outcome_summary(outcome: MergeOutcome, host: Host | None = None) -> dict[str, Any]:
    """A JSON-able account of a finished merge (the API's result, the tab's figures).

    ``shorthash`` is what the host's WebUI writes into infotexts (``Lora hashes``): A1111 hashes the tensor
    data (the addnet hash, also Civitai's AutoV3), Forge the whole file; ``sha256`` is always the addnet hash.
    """
    rep = outcome.export
    hash_of = getattr(host, "lora_hash", None)
    webui_hash = hash_of(outcome.path) if hash_of is not None else rep.sha256
    data: dict[str, Any] = {
        "file": str(outcome.path),
        "name": outcome.path.stem,
        "sha256": rep.sha256,
        "shorthash": webui_hash[:12],
        "tag": outcome.tag,
        "trigger_words": outcome.trigger_words,
        "layers": len(rep.layers),
        "ranks": rep.rank_counts(),
        "size_bytes": rep.size_bytes,
        "svd_relative_error": rep.relative_error,
        "timings": outcome.timings,
        "notes": outcome.notes,
        "content": outcome.content,
        "style": outcome.style,
    }
    z = outcome.zip
    if z is not None:
        data.update(
            steps=z.steps_run,
            stop_reason=z.stop_reason,
            similarity_before=z.initial_similarity,
            similarity_after=z.final_similarity,
            merger_movement=z.movement.__dict__,
            forms=z.forms,
        )
    return data


class MergeService:
    def __init__(self, host: Host) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple[JobStatus, Progress, dict[str, Any]]] = {}
        self._running: str | None = None
        self._counter = itertools.count(1)

    # -- submitting -------------------------------------------------------------------------------------------
    def submit_merge(self, request: MergeRequest, progress: Progress | None = None) -> str:
        request = request.validated()  # a bad request fails here, synchronously, before any thread
        return self._start("merge", lambda p: run_merge(request, self.host, p), progress)

    def submit_preview(self, spec: PreviewSpec, progress: Progress | None = None) -> str:
        return self._start("preview", lambda p: self._preview(spec, p), progress)

    def _start(self, kind: str, work: Callable[[Progress], Any], progress: Progress | None) -> str:
        progress = progress or Progress()
        with self._lock:
            if self._running is not None:
                running = self._jobs[self._running][0]
                raise BusyError(f"a {running.kind} is running (job {running.id}); wait for it or interrupt it")
            job_id = f"{next(self._counter)}-{uuid.uuid4().hex[:8]}"
            status = JobStatus(job_id, kind, "running", progress.snapshot())
            objects: dict[str, Any] = {}
            self._jobs[job_id] = (status, progress, objects)
            self._running = job_id
        thread = threading.Thread(target=self._run, args=(job_id, work), name=f"ziplora-{kind}-{job_id}", daemon=True)
        thread.start()
        return job_id

    def _run(self, job_id: str, work: Callable[[Progress], Any]) -> None:
        status, progress, objects = self._jobs[job_id]
        # a BaseException (SystemExit, KeyboardInterrupt raised in this thread) leaves this: never stuck "running"
        state, error, summary = "failed", "internal error: the job stopped unexpectedly; nothing was written", None
        try:
            with self.host.job(progress):
                result = work(progress)
            objects["result"] = result
            if isinstance(result, MergeOutcome):
                summary = outcome_summary(result, self.host)
            state, error = "done", None
        except JobInterrupted as err:
            state, error = "interrupted", str(err)
        except ZipLoraError as err:
            state, error = "failed", str(err)
        except Exception as err:  # noqa: BLE001 - one readable line for the user, the traceback in the log
            log.exception("ZipLoRA job %s failed", job_id)
            state, error = "failed", f"internal error: {type(err).__name__}: {' '.join(str(err).split())}"[:500]
        finally:
            with self._lock:
                self._running = None
            status.finished = time.time()
            status.progress = progress.snapshot()
            status.result, status.error = summary, error
            status.state = state  # last: whoever sees the job end can start the next one at once

    # -- asking ---------------------------------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        status, progress, _ = self._jobs[job_id]
        if status.state == "running":
            status.progress = progress.snapshot()
        return status

    def result(self, job_id: str) -> Any:
        return self._jobs[job_id][2].get("result")

    def running(self) -> str | None:
        return self._running

    def interrupt(self, job_id: str | None = None) -> bool:
        job_id = job_id or self._running
        if job_id is None or job_id not in self._jobs:
            return False
        self._jobs[job_id][1].interrupt()
        return True

    def wait(self, job_id: str, timeout: float = 600.0) -> JobStatus:
        deadline = time.monotonic() + timeout
        while self.status(job_id).state == "running":
            if time.monotonic() > deadline:
                raise TimeoutError(job_id)
            time.sleep(0.05)
        return self.status(job_id)

    # -- quick synchronous work -----------------------------------------------------------------------------
    def reexport(self, output: Path, style_multiplier: float) -> dict[str, Any]:
        with self._lock:
            if self._running is not None:
                raise BusyError("a job is running; rewrite when it has finished")
            self._running = "reexport"
        try:
            progress = Progress()
            with self.host.job(progress):
                report = reexport(self.host, output, style_multiplier, progress)
            return {"file": str(report.path), "sha256": report.sha256, "seconds": report.seconds}
        finally:
            with self._lock:
                self._running = None

    def _preview(self, spec: PreviewSpec, progress: Progress) -> PreviewGrid:
        import torch

        rows = preview_rows(spec)
        prompts = preview_prompts(spec)
        progress.begin_stage("Rendering the preview", len(rows))
        cells = []
        for i, (_, stack) in enumerate(rows):
            if progress.interrupted():
                raise JobInterrupted("preview interrupted")
            cells.append(self.host.render(prompts, stack, spec.seed, progress))
            progress.advance(i + 1)
        return assemble_grid(torch.cat(cells), [r[0] for r in rows], ["subject in style", "subject alone", "style alone"])
