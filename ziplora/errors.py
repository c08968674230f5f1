"""The project's own error types. Every user-facing failure is one of these, with a one-line message."""

from __future__ import annotations

__all__ = [
    "ZipLoraError",
    "LoraFormatError",
    "UnsupportedLoraError",
    "WrongBaseModelError",
    "IncompatibleLorasError",
    "InvalidRequestError",
    "OutputExistsError",
    "HostError",
    "JobInterrupted",
    "JobFailed",
    "BusyError",
]


class ZipLoraError(Exception):
    """Base of every error we raise on purpose; ``str(err)`` is one readable line."""

    def __str__(self) -> str:  # keep it to one line whatever the caller passed
        return " ".join(super().__str__().split())


class LoraFormatError(ZipLoraError):
    """A file that is not a readable LoRA (truncated, corrupt, pickled, empty, inconsistent)."""


class UnsupportedLoraError(ZipLoraError):
    """A readable LoRA of a kind we do not merge (DoRA, OFT, ...)."""


class WrongBaseModelError(ZipLoraError):
    """A LoRA made for another base model family than the host's (SD1.5 LoRA on SDXL, ...)."""


class IncompatibleLorasError(ZipLoraError):
    """Two LoRAs that cannot be merged together (shape mismatch, embedding name clash, ...)."""


class InvalidRequestError(ZipLoraError):
    """A bad option or name in a merge request."""


class OutputExistsError(InvalidRequestError):
    """The output file exists and overwriting was not asked for."""


class HostError(ZipLoraError):
    """The host model cannot run the job (non-SDXL checkpoint, --lowvram, alternative UNet, ...)."""


class JobInterrupted(ZipLoraError):
    """The user interrupted the job; nothing was written."""


class JobFailed(ZipLoraError):
    """The job failed for a reason outside the inputs (out of memory, NaN loss, disk full, ...)."""


class BusyError(ZipLoraError):
    """Another merge is running."""
