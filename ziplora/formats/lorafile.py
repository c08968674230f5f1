"""One LoRA file read into the canonical model: layers keyed by module path, read lazily, plus metadata."""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ziplora.errors import LoraFormatError, UnsupportedLoraError, WrongBaseModelError
from ziplora.formats.families import CHECKPOINT_PREFIXES, Family, detect_family, reference_shapes
from ziplora.formats.keys import LayerKey, ParsedKey, diffusers_unet_to_sgm, parse_tensor_key
from ziplora.formats.layers import LayerSource, make_layer
from ziplora.formats.safetensors_io import SafetensorsFile

log = logging.getLogger(__name__)

__all__ = ["LoraFile", "LoraSummary", "open_lora"]

_EMBEDDING_PREFIX = "bundle_emb."


@dataclass(frozen=True)
class LoraSummary:
    """What the pickers and ``inspect`` show about a file."""

    name: str
    family: str
    family_evidence: str
    kinds: dict[str, int]
    ranks: list[int]
    unet_layers: int
    te1_layers: int
    te2_layers: int
    trigger_words: list[str]
    embeddings: list[str]
    schemes: list[str]

    @property
    def rank_text(self) -> str:
        if not self.ranks:
            return "-"
        lo, hi = min(self.ranks), max(self.ranks)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    def one_line(self) -> str:
        kinds = "+".join(f"{k}" for k in sorted(self.kinds))
        words = ", ".join(self.trigger_words) or "none"
        return (
            f"{kinds} rank {self.rank_text}, {self.unet_layers} UNet + {self.te1_layers + self.te2_layers} text-encoder "
            f"layers, {self.family}; trigger words: {words}"
        )


@dataclass
class LoraFile:
    path: Path
    st: SafetensorsFile
    family: Family
    family_evidence: str
    groups: dict[LayerKey, dict[str, str]]  # layer -> canonical suffix -> tensor key
    file_names: dict[LayerKey, str]  # layer -> its module name as written in the file
    schemes: set[str]
    embeddings: dict[str, list[str]] = field(default_factory=dict)  # bundled embedding -> tensor keys
    peft_alphas: dict[LayerKey, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def metadata(self) -> dict[str, str]:
        return self.st.metadata

    @property
    def keys(self) -> list[LayerKey]:
        return sorted(self.groups)

    def layer(self, key: LayerKey) -> LayerSource:
        """Read one layer's tensors and build its kind (shape-checked against the family's model)."""
        names = self.groups[key]
        tensors = {suffix: self.st.read(tkey) for suffix, tkey in names.items()}
        if "alpha" not in tensors and key in self.peft_alphas:
            tensors["alpha"] = torch.tensor(self.peft_alphas[key])
        label = f"{self.path.name}: {self.file_names[key]}"
        shapes = reference_shapes(self.family)
        target = shapes.get(key) if shapes else None
        layer = make_layer(key, tensors, label, target)
        if target is not None and layer.shape != target:
            raise LoraFormatError(
                f"{label}: shape mismatch: the delta is {list(layer.shape)} but {self.family.label}'s {key.path} is {list(target)}"
            )
        return layer

    def layer_kind(self, key: LayerKey) -> str:
        suffixes = set(self.groups[key])
        if "hada_w1_a" in suffixes:
            return "loha"
        if any(s.startswith("lokr_") for s in suffixes):
            return "lokr"
        if "diff" in suffixes:
            return "full"
        if "lora_mid" in suffixes:
            return "locon-tucker"
        down = self.groups[key].get("lora_down")
        if down is not None and len(self.st.tensors[down].shape) == 4 and self.st.tensors[down].shape[2:] != (1, 1):
            return "locon"
        return "lora"

    def layer_rank(self, key: LayerKey) -> int | None:
        g = self.groups[key]
        for suffix in ("lora_down", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
            if suffix in g:
                r = int(self.st.tensors[g[suffix]].shape[0])
                if suffix == "hada_w1_b" and "hada_w2_b" in g:
                    r *= int(self.st.tensors[g["hada_w2_b"]].shape[0])
                return r
        return None

    @cached_property
    def data_hash(self) -> str:
        """A1111's LoRA hash (sha256 of the tensor data; the header is excluded)."""
        return self.st.data_hash()

    # -- metadata ------------------------------------------------------------------------------------------
    @cached_property
    def sidecar(self) -> dict:
        """The A1111 user-metadata sidecar ``<stem>.json`` beside the file, if any (bad JSON is ignored)."""
        path = self.path.with_suffix(".json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            return {}
        return data if isinstance(data, dict) else {}

    @cached_property
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        raw = self.metadata.get("ss_tag_frequency")
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            return {}
        if not isinstance(data, dict):
            return {}
        out: dict[str, dict[str, int]] = {}
        for folder, tags in data.items():
            if isinstance(tags, dict):  # counts as written by kohya; NaN / 1e999 (json's inf) are no counts
                out[str(folder)] = {str(t): int(c) for t, c in tags.items() if isinstance(c, (int, float)) and math.isfinite(c)}
        return out

    @property
    def trigger_words(self) -> list[str]:
        """The sidecar's activation text, else ModelSpec's trigger phrase, else the most frequent tags."""
        for text in (self.sidecar.get("activation text"), self.metadata.get("modelspec.trigger_phrase")):
            if isinstance(text, str) and text.strip():
                return [w.strip() for w in text.split(",") if w.strip()]
        counts: Counter[str] = Counter()
        for tags in self.tag_frequency.values():
            counts.update(tags)
        return [tag.strip() for tag, _ in counts.most_common(3) if tag.strip()]

    @property
    def title(self) -> str:
        return self.metadata.get("modelspec.title") or self.metadata.get("ss_output_name") or self.name

    def summary(self) -> LoraSummary:
        kinds = Counter(self.layer_kind(k) for k in self.groups)
        ranks = sorted({r for k in self.groups if (r := self.layer_rank(k)) is not None})
        count = Counter(k.component for k in self.groups)
        return LoraSummary(
            name=self.name,
            family=self.family.label,
            family_evidence=self.family_evidence,
            kinds=dict(kinds),
            ranks=ranks,
            unet_layers=count["unet"],
            te1_layers=count["te1"],
            te2_layers=count["te2"],
            trigger_words=self.trigger_words,
            embeddings=sorted(self.embeddings),
            schemes=sorted(self.schemes),
        )


def _peft_alphas(
    metadata: dict[str, str], groups: dict[LayerKey, dict[str, str]], file_names: dict[LayerKey, str]
) -> dict[LayerKey, float]:
    """Alphas from diffusers' ``lora_adapter_metadata`` (PEFT config per component)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(config, dict):
        return {}
    prefixes = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
    out = {}
    for key in groups:
        prefix = prefixes[key.component]
        section = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)} or config
        alpha = section.get("lora_alpha")
        patterns = section.get("alpha_pattern") or {}
        if isinstance(patterns, dict):
            name = file_names[key]
            for pattern, value in patterns.items():
                if name.endswith(pattern) or re.fullmatch(f"(.*\\.)?{pattern}", name):
                    alpha = value
        if isinstance(alpha, (int, float)):
            out[key] = float(alpha)
    return out


def open_lora(path: str | Path, expect: Family | tuple[Family, ...] | None = None) -> LoraFile:
    """Read a LoRA file's header and layout (no tensor data beyond what the checks need).

    Raises ``LoraFormatError`` for anything unreadable, ``WrongBaseModelError`` when ``expect`` is given
    and the file was made for another family, ``UnsupportedLoraError`` for kinds we do not merge.
    """
    st = SafetensorsFile(path)
    p = Path(path)
    raw_keys = list(st.tensors)
    if not raw_keys:
        raise LoraFormatError(f"{p.name}: the file holds no tensors")
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in raw_keys) and not any("lora" in k for k in raw_keys):
        raise LoraFormatError(f"{p.name}: this is a model checkpoint, not a LoRA")

    parsed: dict[str, ParsedKey] = {}
    embeddings: dict[str, list[str]] = {}
    unknown = []
    for tkey in raw_keys:
        if tkey.startswith(_EMBEDDING_PREFIX):
            name = tkey[len(_EMBEDDING_PREFIX) :].split(".", 1)[0]
            embeddings.setdefault(name, []).append(tkey)
            continue
        pk = parse_tensor_key(tkey)
        if pk is None:
            unknown.append(tkey)
        else:
            parsed[tkey] = pk

    unet_paths: dict[str, str] = {}
    for tkey, pk in parsed.items():
        if pk.component != "unet":
            continue
        if pk.scheme == "kohya":
            unet_paths[tkey] = pk.raw_path
        else:
            sgm = diffusers_unet_to_sgm(pk.raw_path)
            if sgm is not None:
                unet_paths[tkey] = sgm
    shapes = {k: st.tensors[k].shape for k in parsed}
    family, evidence = detect_family(raw_keys, parsed, unet_paths, shapes, st.metadata)
    _check_family(p, family, evidence, expect)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise LoraFormatError(f"{p.name}: unrecognised tensor names: {shown}")

    groups: dict[LayerKey, dict[str, str]] = {}
    file_names: dict[LayerKey, str] = {}
    schemes: set[str] = set()
    for tkey, pk in parsed.items():
        if pk.component == "unet":
            path_ = unet_paths.get(tkey)
            if path_ is None:
                raise LoraFormatError(f"{p.name}: {tkey} names no layer of the SDXL UNet")
            key = LayerKey("unet", path_)
        elif pk.component in ("te1", "te2"):
            key = LayerKey(pk.component, pk.raw_path)
        else:
            raise LoraFormatError(f"{p.name}: {tkey} belongs to no UNet or text encoder")
        previous = file_names.setdefault(key, pk.written)
        group = groups.setdefault(key, {})
        if pk.suffix in group or (previous != pk.written and _module_name(previous) != _module_name(pk.written)):
            raise LoraFormatError(f"{p.name}: layer {key.path} appears twice (as {previous} and {pk.written})")
        group[pk.suffix] = tkey
        schemes.add(pk.scheme)

    groups = {k: g for k, g in groups.items() if set(g) - {"alpha", "scale"}}  # alpha-only entries carry no delta
    if not groups:
        raise LoraFormatError(f"{p.name}: no LoRA layers found")
    for key, g in groups.items():
        if "dora_scale" in g:
            raise UnsupportedLoraError(f"{p.name}: DoRA (dora_scale) layers are not supported yet ({file_names[key]})")
    shapes_ref = reference_shapes(family)
    if shapes_ref is not None:
        missing = [file_names[k] for k in groups if k not in shapes_ref]
        if missing:
            raise LoraFormatError(
                f"{p.name}: {missing[0]} names no layer of {family.label}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    lora = LoraFile(p, st, family, evidence, groups, file_names, schemes, embeddings)
    lora.peft_alphas = _peft_alphas(st.metadata, groups, file_names)
    return lora


def _module_name(written: str) -> str:
    """Strip diffusers' per-factor endings so the tensors of one module compare equal."""
    return re.sub(r"(_lora)?\.(lora|lora_linear_layer)$|_lora$", "", written.replace(".processor", ""))


def _check_family(path: Path, family: Family, evidence: str, expect: Family | tuple[Family, ...] | None) -> None:
    if expect is None:
        if family in (Family.UNKNOWN,):
            raise WrongBaseModelError(f"{path.name}: not a LoRA for a model we know ({evidence})")
        return
    wanted = expect if isinstance(expect, tuple) else (expect,)
    if family not in wanted:
        names = " or ".join(f.label for f in wanted)
        raise WrongBaseModelError(f"{path.name}: this LoRA is for {family.label}, not {names} ({evidence})")
