"""Progress and interrupt: what a job reports, and how each face (console, tab, WebUI state, API) listens."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["StepRecord", "Progress", "ConsoleProgress", "ProgressState"]


@dataclass(frozen=True)
class StepRecord:
    """One optimisation step's losses (the live plot) and the mean |cos| between merger pairs."""

    step: int
    content: float
    style: float
    similarity: float  # the λ-free similarity term
    total: float
    mean_cos: float


class Progress:
    """Base reporter: stages with counts, a text line, step records and an interrupt flag.

    Thread-safe: a job runs in one thread while a UI or an API request reads ``snapshot()``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interrupt = threading.Event()
        self.stage = ""
        self.done = 0
        self.total = 0
        self.text = ""
        self.records: list[StepRecord] = []
        self.stage_started = time.monotonic()
        self.job_started = time.monotonic()
        self._listeners: list[Callable[[Progress], None]] = []
        self._interrupt_sources: list[Callable[[], bool]] = []

    # -- hooks for hosts (A1111/Forge mirror this into shared.state and read its Interrupt flag) ----------
    def add_listener(self, listener: Callable[[Progress], None]) -> Callable[[], None]:
        """Call ``listener(self)`` on every change; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def add_interrupt_source(self, source: Callable[[], bool]) -> Callable[[], None]:
        """Also stop when ``source()`` is true; returns a function that removes it."""
        self._interrupt_sources.append(source)
        return lambda: self._interrupt_sources.remove(source) if source in self._interrupt_sources else None

    # -- reported by the job ----------------------------------------------------------------------------
    def begin_stage(self, stage: str, total: int) -> None:
        with self._lock:
            self.stage, self.done, self.total, self.text = stage, 0, total, ""
            self.stage_started = time.monotonic()
        self.on_change()

    def advance(self, done: int, text: str = "") -> None:
        with self._lock:
            self.done = done
            if text:
                self.text = text
        self.on_change()

    def record(self, rec: StepRecord) -> None:
        with self._lock:
            self.records.append(rec)

    def clear_records(self) -> None:
        """Forget the step records (a retry starts the loss curve again)."""
        with self._lock:
            self.records = []

    def interrupted(self) -> bool:
        if not self._interrupt.is_set() and any(source() for source in list(self._interrupt_sources)):
            self._interrupt.set()
        return self._interrupt.is_set()

    # -- asked by the user ----------------------------------------------------------------------------------
    def interrupt(self) -> None:
        self._interrupt.set()

    def eta_seconds(self) -> float | None:
        with self._lock:
            if self.done <= 0 or self.total <= 0:
                return None
            spent = time.monotonic() - self.stage_started
            return spent / self.done * (self.total - self.done)

    def snapshot(self) -> ProgressState:
        eta = self.eta_seconds()
        with self._lock:
            return ProgressState(self.stage, self.done, self.total, self.text, eta, list(self.records))

    def on_change(self) -> None:
        """Called on every change: tells the listeners; subclasses draw (the console line)."""
        for listener in list(self._listeners):
            listener(self)


@dataclass(frozen=True)
class ProgressState:
    stage: str
    done: int
    total: int
    text: str
    eta_seconds: float | None
    records: list[StepRecord] = field(default_factory=list)

    def line(self) -> str:
        eta = f", about {self.eta_seconds:.0f} s left" if self.eta_seconds is not None else ""
        count = f" {self.done}/{self.total}" if self.total else ""
        text = f" - {self.text}" if self.text else ""
        return f"{self.stage}{count}{eta}{text}"


class ConsoleProgress(Progress):
    """One updating line on stderr (the CLI's progress bar)."""

    def __init__(self, stream=None, quiet: bool = False) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.stream = stream or sys.stderr
        # a progress bar only on a terminal: logs and pipes get the result lines alone
        self.quiet = quiet or not getattr(self.stream, "isatty", lambda: False)()
        self._last = 0.0
        self._open = False

    def on_change(self) -> None:
        super().on_change()
        if self.quiet:
            return
        now = time.monotonic()
        if now - self._last < 0.2 and self.done < self.total:
            return
        self._last = now
        line = self.snapshot().line()
        finished = bool(self.total) and self.done >= self.total
        self.stream.write(f"\r{line[:118]:<118}" + ("\n" if finished else ""))
        self.stream.flush()
        self._open = not finished

    def close(self) -> None:
        """End a half-drawn line, so what follows (an error) starts on its own line."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
