"""The merger vectors beside a ZipLoRA output (``<name>.ziplora``): a new style multiplier is a re-export, not a
new optimisation. The suffix is not ``.safetensors``, so the WebUIs' LoRA lists never show the file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ziplora.errors import InvalidRequestError, LoraFormatError
from ziplora.export.options import Mergers
from ziplora.formats.keys import KOHYA_PREFIXES, LayerKey, kohya_name
from ziplora.formats.lorafile import LoraFile
from ziplora.formats.safetensors_io import SafetensorsFile
from ziplora.metadata import Provenance
from ziplora.request import check_number

__all__ = ["MERGERS_SUFFIX", "SavedMergers", "mergers_payload", "load_mergers"]

MERGERS_SUFFIX = ".ziplora"


def mergers_payload(
    mergers: Mergers, content: LoraFile, style: LoraFile, provenance: Provenance
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors (``m_c.<kohya name>``, ``m_s.<kohya name>``) and header (sources, provenance, keys)."""
    tensors = {}
    for key, (mc, ms) in sorted(mergers.items()):
        tensors[f"m_c.{kohya_name(key)}"] = mc.detach().float().cpu().contiguous()
        tensors[f"m_s.{kohya_name(key)}"] = ms.detach().float().cpu().contiguous()
    meta = {
        "ziplora_mergers": "1",
        "content_path": str(content.path.resolve()),
        "content_sha256": content.data_hash,
        "style_path": str(style.path.resolve()),
        "style_sha256": style.data_hash,
        "provenance": json.dumps(provenance.__dict__),
        "keys": json.dumps([[k.component, k.path] for k in sorted(mergers)]),
    }
    return tensors, meta


@dataclass(frozen=True)
class SavedMergers:
    mergers: Mergers
    content_path: Path
    content_sha256: str
    style_path: Path
    style_sha256: str
    provenance: Provenance


def load_mergers(path: Path) -> SavedMergers:
    st = SafetensorsFile(path)
    meta = st.metadata
    if meta.get("ziplora_mergers") != "1":
        raise LoraFormatError(f"{path.name}: not a ZipLoRA mergers file")
    try:
        keys = [LayerKey(c, p) for c, p in json.loads(meta["keys"])]
        prov = Provenance(**json.loads(meta["provenance"]))
        sources = Path(meta["content_path"]), meta["content_sha256"], Path(meta["style_path"]), meta["style_sha256"]
        if not all(k.component in KOHYA_PREFIXES and isinstance(k.path, str) for k in keys):
            raise ValueError("bad layer keys")
        check_number("content weight", prov.content_weight, 0.0, 2.0)
        if prov.target_rank is not None:
            check_number("target rank", prov.target_rank, 1, 4096, integer=True)
    except (KeyError, ValueError, TypeError, RecursionError, InvalidRequestError) as err:
        raise LoraFormatError(f"{path.name}: corrupt mergers file ({type(err).__name__}: {err})") from None
    mergers: Mergers = {}
    with st.reader() as read:
        for key in keys:
            name = kohya_name(key)
            try:
                mc, ms = read(f"m_c.{name}").float(), read(f"m_s.{name}").float()
            except KeyError:
                raise LoraFormatError(f"{path.name}: mergers for {key.path} are missing") from None
            if mc.dim() != 1 or mc.shape != ms.shape or not bool(torch.isfinite(mc).all() and torch.isfinite(ms).all()):
                raise LoraFormatError(f"{path.name}: corrupt mergers file (the mergers for {key.path} are not two finite vectors)")
            mergers[key] = (mc, ms)
    return SavedMergers(mergers, *sources, prov)
