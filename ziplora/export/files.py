"""Putting the written files in place together: the LoRA and its companions (mergers file, sidecar), atomically.

Every file is written whole under a temporary name first; only then are they renamed into place, the LoRA last.
So a failure while writing (disk full, interrupt) changes nothing on disk, and an overwritten output keeps its
old LoRA, sidecar and mergers until the new ones are complete.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ziplora.export.mergers_file import MERGERS_SUFFIX
from ziplora.formats.safetensors_io import PendingTensor, StagedFile, stage_safetensors

log = logging.getLogger(__name__)

__all__ = ["commit_together", "remove_stale_mergers"]


def commit_together(out: Path, pending: list[PendingTensor], metadata: dict[str, str], overwrite: bool,
                    companions: list[Callable[[], StagedFile]]) -> str:  # fmt: skip
    """Stage the LoRA, then each companion; commit the companions and the LoRA last. Returns the LoRA's addnet hash.

    On any failure every staged file is discarded and companions that did not exist before are taken back.
    """
    staged: list[StagedFile] = []
    created: list[Path] = []  # companions that did not exist before: taken back if the LoRA cannot be put in place
    try:
        digest, lora_file = stage_safetensors(out, pending, metadata, overwrite=overwrite)
        staged.append(lora_file)
        for stage in companions:
            staged.append(stage())
        for companion in staged[1:]:
            if not companion.path.exists():
                created.append(companion.path)
            companion.commit()
        lora_file.commit()
    except BaseException:
        for file in staged:
            file.discard()
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return digest


def remove_stale_mergers(out: Path) -> None:
    """A direct merge written over an earlier ZipLoRA output: its mergers no longer describe this file."""
    stale = out.with_suffix(MERGERS_SUFFIX)
    if stale.exists():
        try:
            stale.unlink()
        except OSError as err:  # the merge itself is written: say so in the log rather than fail it
            log.warning("could not remove the stale mergers %s: %s", stale, err)
