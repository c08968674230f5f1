"""Write a merged LoRA exactly: concatenated factors, style multiplier, optional rank, metadata, sidecar.

For a layer both sources touch, ``dW_c·diag(m_c)·w_c + dW_s·diag(m_s)·w_s`` is exactly the LoRA with
``up = [B_c s_c w_c | B_s s_s w_s]`` and ``down = [A_c·diag(m_c); A_s·diag(m_s)]`` (DESIGN, "Exact export").

- ``write``: ``export_merge``, the whole write, all or nothing;
- ``layer_merge``: one layer from both sources (mergers, weights, concatenation);
- ``rank``: the target rank and the SVD error bookkeeping;
- ``plan`` / ``stream``: pass 1 (every layer's rank for the header) and pass 2 (each layer's tensors, in order);
- ``header``: the file's metadata and the A1111 sidecar (keys from ``ziplora.metadata``);
- ``sources``: the inputs' checks and their bundled embeddings;
- ``mergers_file``: the ``.ziplora`` file of merger vectors a re-export reads;
- ``files``: putting the LoRA and its companions in place together;
- ``options``: ``ExportOptions`` and the reports.
"""

from __future__ import annotations

from ziplora.export.header import source_info
from ziplora.export.mergers_file import MERGERS_SUFFIX, SavedMergers, load_mergers
from ziplora.export.options import ExportOptions, ExportReport, LayerReport, Mergers
from ziplora.export.sources import check_merge_sources
from ziplora.export.write import export_merge

__all__ = [
    "ExportOptions",
    "ExportReport",
    "LayerReport",
    "Mergers",
    "export_merge",
    "source_info",
    "load_mergers",
    "SavedMergers",
    "MERGERS_SUFFIX",
    "check_merge_sources",
]
