"""The written file's header and its A1111 sidecar, from the sources, the provenance and the write plan.

The keys themselves are assembled in one place, ``ziplora.metadata``; this is the glue that feeds it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ziplora.export.options import ExportOptions
from ziplora.export.plan import WritePlan
from ziplora.export.rank import relative_error
from ziplora.formats.lorafile import LoraFile
from ziplora.metadata import Provenance, SourceInfo, build_metadata, build_sidecar

__all__ = ["source_info", "file_metadata", "sidecar_bytes"]


def source_info(lora: LoraFile) -> SourceInfo:
    return SourceInfo(lora.name, lora.title, lora.data_hash, tuple(lora.trigger_words), lora.tag_frequency)


def _header_svd_error(plan: WritePlan, options: ExportOptions) -> float | None:
    """The SVD error of the layers known before writing (exact layers add none); None when all are exact."""
    computed = plan.computed.values()
    if not any(r.err2 > 0 for r in computed) and options.target_rank is None:
        return None
    return relative_error(sum(r.norm2 for r in computed), sum(r.err2 for r in computed))


def file_metadata(
    out: Path,
    content: LoraFile,
    style: LoraFile,
    provenance: Provenance,
    plan: WritePlan,
    options: ExportOptions,
    mergers_path: Path | None,
) -> dict[str, str]:
    """Every header key of the merged file; call it before writing (the plan's computed layers are still there)."""
    svd_error = _header_svd_error(plan, options)
    return build_metadata(
        output_name=out.stem,
        content=source_info(content),
        style=source_info(style),
        provenance=provenance,
        ranks=[p.rank for p in plan.layers.values() if not p.full],
        alpha=plan.alpha,
        base_model_version=options.base_model_version,
        architecture=options.architecture,
        resolution=options.resolution,
        description=options.description,
        author=options.author,
        svd_error=svd_error if options.target_rank is None else None,
        mergers_file=mergers_path.name if mergers_path else None,
        embeddings=sorted(set(content.embeddings) | set(style.embeddings)),
    )


def sidecar_bytes(content: LoraFile, style: LoraFile, provenance: Provenance, options: ExportOptions) -> bytes:
    """The A1111 / Forge user-metadata sidecar ``<name>.json``, as written."""
    data = build_sidecar(
        content=source_info(content), style=source_info(style), provenance=provenance, description=options.description,
        sd_version=options.sd_version,
    )  # fmt: skip
    return json.dumps(data, indent=4, ensure_ascii=False).encode("utf-8")
