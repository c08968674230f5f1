"""``export_merge``: write the merged LoRA, its sidecar and (for ZipLoRA) its mergers file, all or nothing.

Pass 1 (``plan``) sizes every layer for the header; pass 2 (``stream``) merges and writes the layers one at a
time; ``files`` puts everything in place together.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ziplora.errors import InvalidRequestError, OutputExistsError
from ziplora.export.files import commit_together, remove_stale_mergers
from ziplora.export.header import file_metadata, sidecar_bytes
from ziplora.export.mergers_file import MERGERS_SUFFIX, mergers_payload
from ziplora.export.options import ExportOptions, ExportReport, Mergers
from ziplora.export.plan import plan_layers
from ziplora.export.rank import relative_error
from ziplora.export.sources import check_embeddings, check_merge_sources, embedding_tensors
from ziplora.export.stream import LayerStream
from ziplora.formats.lorafile import LoraFile
from ziplora.formats.safetensors_io import StagedFile, stage_bytes, stage_safetensors
from ziplora.metadata import Provenance

__all__ = ["export_merge"]


def export_merge(
    content: LoraFile,
    style: LoraFile,
    out: Path,
    options: ExportOptions,
    provenance: Provenance,
    mergers: Mergers | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Write the merged LoRA (and its sidecar, and the mergers file when given) atomically."""
    t0 = time.perf_counter()
    if out.suffix != ".safetensors":
        raise InvalidRequestError(f"output {out.name} must end in .safetensors")
    if out.exists() and not options.overwrite:
        raise OutputExistsError(f"{out.name} exists in {out.parent}; choose another name or allow overwriting")
    check_merge_sources(content, style)
    check_embeddings(content, style)
    keys = sorted(set(content.groups) | set(style.groups))
    plan = plan_layers(keys, content, style, mergers, options)
    stream = LayerStream(content, style, mergers, options, plan, should_stop, on_layer)
    pending = [tensor for key in keys for tensor in stream.tensors(key)] + embedding_tensors(content, style)
    mergers_path = out.with_suffix(MERGERS_SUFFIX) if mergers is not None else None
    metadata = file_metadata(out, content, style, provenance, plan, options, mergers_path)
    companions: list[Callable[[], StagedFile]] = []
    if mergers is not None and mergers_path is not None:
        companions.append(lambda: stage_safetensors(mergers_path, *mergers_payload(mergers, content, style, provenance), overwrite=True)[1])
    sidecar = out.with_suffix(".json") if options.write_sidecar else None
    if sidecar is not None:
        companions.append(lambda: stage_bytes(sidecar, sidecar_bytes(content, style, provenance, options), overwrite=True))
    digest = commit_together(out, pending, metadata, options.overwrite, companions)
    if mergers is None:
        remove_stale_mergers(out)
    full = sum(p.full for p in plan.layers.values())
    notes = [
        f"{full} layer(s) carry a bias delta (diff_b): written in full form (diff + diff_b), which A1111 and Forge load"
        + ("; the target rank does not apply to them" if options.target_rank is not None else "")
    ] if full else []  # fmt: skip
    return ExportReport(
        path=out,
        sha256=digest,
        alpha=plan.alpha,
        layers=stream.reports,
        relative_error=relative_error(stream.norm2, stream.err2),
        seconds=time.perf_counter() - t0,
        size_bytes=out.stat().st_size,
        sidecar=sidecar,
        mergers_file=mergers_path,
        notes=notes,
    )
