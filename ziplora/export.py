"""Write a merged LoRA exactly: concatenated factors, style multiplier, optional rank, metadata, sidecar.

For a layer both sources touch, ``dW_c·diag(m_c)·w_c + dW_s·diag(m_s)·w_s`` is exactly the LoRA with
``up = [B_c s_c w_c | B_s s_s w_s]`` and ``down = [A_c·diag(m_c); A_s·diag(m_s)]`` (DESIGN, "Exact export").
Every layer is written with the same alpha; each layer's remaining scale is folded into its up matrix.
Layers are read, merged and written one at a time, so memory stays at one layer plus the file buffers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ziplora.errors import (
    IncompatibleLorasError,
    InvalidRequestError,
    JobFailed,
    JobInterrupted,
    LoraFormatError,
    OutputExistsError,
)
from ziplora.formats.families import reference_shapes
from ziplora.formats.keys import KOHYA_PREFIXES, LayerKey, kohya_name
from ziplora.formats.layers import Factors, truncate_factors
from ziplora.formats.lorafile import LoraFile
from ziplora.formats.safetensors_io import (
    PendingTensor,
    SafetensorsFile,
    StagedFile,
    stage_bytes,
    stage_safetensors,
    write_safetensors,
)
from ziplora.metadata import Provenance, SourceInfo, build_metadata, build_sidecar
from ziplora.request import check_number

log = logging.getLogger(__name__)

__all__ = [
    "ExportOptions",
    "ExportReport",
    "LayerReport",
    "Mergers",
    "export_merge",
    "source_info",
    "save_mergers",
    "load_mergers",
    "MERGERS_SUFFIX",
]

Mergers = dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]  # layer -> (m_c, m_s), fp32, one per input column
MERGERS_SUFFIX = ".ziplora"  # not .safetensors, so the WebUIs' LoRA lists never show it


@dataclass(frozen=True)
class ExportOptions:
    content_weight: float = 1.0
    style_multiplier: float = 1.0
    target_rank: int | None = None
    dtype: torch.dtype = torch.float16
    overwrite: bool = False
    description: str = ""
    author: str = ""
    base_model_version: str = "sdxl_base_v1-0"
    architecture: str = "stable-diffusion-xl-v1-base/lora"
    resolution: str = "1024x1024"
    sd_version: str = "SDXL"
    write_sidecar: bool = True


@dataclass(frozen=True)
class LayerReport:
    key: LayerKey
    sources: str  # "both" | "content" | "style"
    rank: int
    how: str  # "exact" | "svd"
    relative_error: float


@dataclass
class ExportReport:
    path: Path
    sha256: str  # addnet hash of the written file (what A1111 shows, and Civitai's AutoV3)
    alpha: float
    layers: list[LayerReport]
    relative_error: float  # over all layers, weighted by each layer's Frobenius norm
    seconds: float
    size_bytes: int
    sidecar: Path | None = None
    mergers_file: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def shorthash(self) -> str:
        return self.sha256[:12]

    def rank_counts(self) -> dict[int, int]:
        return dict(Counter(layer.rank for layer in self.layers))


def source_info(lora: LoraFile) -> SourceInfo:
    return SourceInfo(lora.name, lora.title, lora.data_hash, tuple(lora.trigger_words), lora.tag_frequency)


@dataclass
class _LayerResult:
    factors: Factors
    report: LayerReport
    norm2: float  # squared Frobenius norm of the exact merged delta
    err2: float  # squared Frobenius norm of what the SVDs dropped


def _merged_layer(
    key: LayerKey,
    content: LoraFile,
    style: LoraFile,
    mergers: Mergers | None,
    options: ExportOptions,
    need_norm: bool = True,
) -> _LayerResult:
    """Read one layer from both files and build its written factors.

    ``need_norm``: the layer's norm only weighs the file's overall SVD error; exact files skip it.
    """
    parts: list[Factors] = []
    err2 = 0.0
    how = "exact"
    for lora, weight, index in ((content, options.content_weight, 0), (style, options.style_multiplier, 1)):
        if key not in lora.groups:
            continue
        f, err, part_how = lora.layer(key).factors()
        if mergers is not None and key in mergers:
            m = mergers[key][index]
            if m.dim() != 1 or m.numel() != f.shape[1] or not bool(torch.isfinite(m).all()):
                raise IncompatibleLorasError(
                    f"layer {key.path}: the mergers ({list(m.shape)}) do not fit its {f.shape[1]} input columns or are not finite; merge again"
                )
            f = f.scale_inputs(m.float())
        if weight != 1.0:
            f = f.scale_outputs(weight)
        if err:
            # the SVD kept 1 - err^2 of this part's energy: what it dropped is err^2/(1 - err^2) of what it kept
            err2 += f.norm2() * err * err / max(1e-12, 1 - err * err)
            how = "svd"
        parts.append(f)
    if len(parts) == 2 and parts[0].shape != parts[1].shape:
        raise IncompatibleLorasError(
            f"layer {key.path}: content delta {list(parts[0].shape)} and style delta {list(parts[1].shape)} differ"
        )
    merged = Factors.concat(parts)
    norm2 = merged.norm2() + err2 if (need_norm or err2 > 0 or options.target_rank is not None) else 0.0
    if options.target_rank is not None and merged.rank > options.target_rank:
        kept = merged.norm2()
        merged, err = truncate_factors(merged, options.target_rank)
        err2 += kept * err * err
        how = "svd"
    rel = math.sqrt(err2 / norm2) if norm2 > 0 and err2 > 0 else 0.0
    sources = "both" if len(parts) == 2 else ("content" if key in content.groups else "style")
    return _LayerResult(merged, LayerReport(key, sources, merged.dim, how, rel), norm2, err2)


def _header_plan(key: LayerKey, content: LoraFile, style: LoraFile, target_rank: int | None) -> tuple[int, tuple[int, ...]] | None:
    """(written rank, delta shape) from the headers alone, for plain LoRA/LoCon layers; None otherwise."""
    ranks = []
    shape: tuple[int, ...] | None = None
    for lora in (content, style):
        if key not in lora.groups:
            continue
        g = lora.groups[key]
        if lora.layer_kind(key) not in ("lora", "locon") or not {"lora_up", "lora_down"} <= set(g):
            return None  # read in full: the layer's own checks say what is wrong with an incomplete one
        up, down = lora.st.tensors[g["lora_up"]].shape, lora.st.tensors[g["lora_down"]].shape
        if len(up) not in (2, 4) or len(down) not in (2, 4):
            return None  # likewise for factors that are no matrices
        ranks.append(int(down[0]))
        shape = (int(up[0]), int(down[1]), *(int(d) for d in down[2:]))
    assert shape is not None
    ref = reference_shapes((content if key in content.groups else style).family)
    if ref is not None and key in ref and ref[key] != shape and math.prod(ref[key]) == math.prod(shape):
        shape = ref[key]  # a 1x1-conv-shaped delta on a Linear, or the reverse
    rank = sum(ranks)
    if target_rank is not None:
        rank = min(rank, target_rank)
    return rank, shape


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
    keys = sorted(set(content.groups) | set(style.groups))
    for name in sorted(set(content.embeddings) & set(style.embeddings)):
        if not _same_embedding(content, style, name):
            raise IncompatibleLorasError(f"both LoRAs bundle an embedding named {name!r} with different vectors; rename one first")

    # Pass 1: the header needs every layer's rank. Plain LoRA layers give it from their headers; the
    # others (LoHa, LoKr, full, Tucker) are computed now and kept until they are written.
    computed: dict[LayerKey, _LayerResult] = {}
    plans: dict[LayerKey, tuple[int, tuple[int, ...], int | None]] = {}  # rank, shape, Tucker core width
    for key in keys:
        plan = _header_plan(key, content, style, options.target_rank)
        if plan is None:
            res = _merged_layer(key, content, style, mergers, options)
            computed[key] = res
            f = res.factors
            plans[key] = (f.dim, f.shape, None if f.mid is None else int(f.mid.shape[0]))
        else:
            plans[key] = (plan[0], plan[1], None)
    alpha = float(Counter(p[0] for p in plans.values()).most_common(1)[0][0])
    need_norms = options.target_rank is not None or any(r.err2 > 0 for r in computed.values())

    reports: list[LayerReport] = []
    totals = [0.0, 0.0]  # norm2, err2
    current: dict[LayerKey, _LayerResult] = {}

    def layer_result(key: LayerKey) -> _LayerResult:
        res = current.get(key)
        if res is None:
            if should_stop is not None and should_stop():
                raise JobInterrupted("interrupted while writing the file; nothing was written")
            res = computed.pop(key, None) or _merged_layer(key, content, style, mergers, options, need_norms)
            current.clear()
            current[key] = res
        return res

    def producer(key: LayerKey, part: str) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            res = layer_result(key)
            f = res.factors
            conv = len(f.shape) == 4
            if part == "down":
                t = f.down.reshape(*f.down.shape, 1, 1) if f.mid is not None else f.down
            elif part == "mid":
                t = f.mid  # type: ignore[assignment]
            elif part == "up":
                t = f.up * (f.dim / alpha)  # A1111 multiplies by alpha / dim: fold the rest in here
                t = t.reshape(*t.shape, 1, 1) if conv else t
            else:  # alpha, the layer's last tensor
                reports.append(res.report)
                totals[0] += res.norm2
                totals[1] += res.err2
                current.clear()
                if on_layer is not None:
                    on_layer(len(reports), len(keys))
                return torch.tensor(alpha, dtype=options.dtype)
            written = t.to(options.dtype).contiguous()
            if not bool(torch.isfinite(written).all()):
                raise JobFailed(f"layer {key.path}: values overflow {str(options.dtype).replace('torch.', '')}; write in float32 instead")
            return written

        return produce

    pending: list[PendingTensor] = []
    dt = options.dtype
    for key in keys:
        name = kohya_name(key)
        rank, shape, core = plans[key]
        out_dim, in_dim, *kernel = shape
        conv = len(kernel) == 2
        if core is not None:
            pending.append(PendingTensor(f"{name}.lora_down.weight", dt, (rank, in_dim, 1, 1), producer(key, "down")))
            pending.append(PendingTensor(f"{name}.lora_mid.weight", dt, (core, rank, *kernel), producer(key, "mid")))
            up_rank = core
        else:
            down_shape = (rank, in_dim, *kernel) if conv else (rank, in_dim)
            pending.append(PendingTensor(f"{name}.lora_down.weight", dt, down_shape, producer(key, "down")))
            up_rank = rank
        up_shape = (out_dim, up_rank, 1, 1) if conv else (out_dim, up_rank)
        pending.append(PendingTensor(f"{name}.lora_up.weight", dt, up_shape, producer(key, "up")))
        pending.append(PendingTensor(f"{name}.alpha", dt, (), producer(key, "alpha")))
    for lora in (content, style):
        for emb_name, tkeys in sorted(lora.embeddings.items()):
            if lora is style and emb_name in content.embeddings:
                continue  # identical copy, checked above
            for tkey in sorted(tkeys):
                info = lora.st.tensors[tkey]
                pending.append(PendingTensor(tkey, lora.st.read(tkey).dtype, info.shape, (lambda lf=lora, k=tkey: lf.st.read(k))))

    mergers_path = out.with_suffix(MERGERS_SUFFIX) if mergers is not None else None
    c_info, s_info = source_info(content), source_info(style)
    svd_layers = [r for r in computed.values() if r.err2 > 0]
    svd_error = None
    if svd_layers or options.target_rank is not None:
        # header value: the SVD error of the layers known before writing (exact layers add no error)
        n2 = sum(r.norm2 for r in computed.values())
        svd_error = math.sqrt(sum(r.err2 for r in computed.values()) / n2) if n2 > 0 else 0.0
    metadata = build_metadata(
        output_name=out.stem,
        content=c_info,
        style=s_info,
        provenance=provenance,
        ranks=[p[0] for p in plans.values()],
        alpha=alpha,
        base_model_version=options.base_model_version,
        architecture=options.architecture,
        resolution=options.resolution,
        description=options.description,
        author=options.author,
        svd_error=svd_error if options.target_rank is None else None,
        mergers_file=mergers_path.name if mergers_path else None,
        embeddings=sorted(set(content.embeddings) | set(style.embeddings)),
    )
    # Every file is written whole under a temporary name first; only then are they renamed into place, the LoRA
    # last. So a failure while writing (disk full, interrupt) changes nothing on disk, and an overwritten output
    # keeps its old LoRA, sidecar and mergers until the new ones are complete.
    staged: list[StagedFile] = []
    sidecar = None
    created: list[Path] = []  # companions that did not exist before: taken back if the LoRA cannot be put in place
    try:
        digest, lora_file = stage_safetensors(out, pending, metadata, overwrite=options.overwrite)
        staged.append(lora_file)
        if mergers is not None and mergers_path is not None:
            staged.append(stage_safetensors(mergers_path, *_mergers_payload(mergers, content, style, provenance), overwrite=True)[1])
        if options.write_sidecar:
            sidecar = out.with_suffix(".json")
            data = build_sidecar(
                content=c_info, style=s_info, provenance=provenance, description=options.description, sd_version=options.sd_version
            )
            staged.append(stage_bytes(sidecar, json.dumps(data, indent=4, ensure_ascii=False).encode("utf-8"), overwrite=True))
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
    stale = out.with_suffix(MERGERS_SUFFIX)
    if mergers is None and stale.exists():
        # a direct merge written over an earlier ZipLoRA output: its mergers no longer describe this file
        try:
            stale.unlink()
        except OSError as err:  # the merge itself is written: say so in the log rather than fail it
            log.warning("could not remove the stale mergers %s: %s", stale, err)
    norm2, err2 = totals
    return ExportReport(
        path=out,
        sha256=digest,
        alpha=alpha,
        layers=reports,
        relative_error=math.sqrt(err2 / norm2) if norm2 > 0 and err2 > 0 else 0.0,
        seconds=time.perf_counter() - t0,
        size_bytes=out.stat().st_size,
        sidecar=sidecar,
        mergers_file=mergers_path,
    )


def _same_embedding(a: LoraFile, b: LoraFile, name: str) -> bool:
    ka, kb = sorted(a.embeddings[name]), sorted(b.embeddings[name])
    if ka != kb:
        return False
    return all(torch.equal(a.st.read(k), b.st.read(k)) for k in ka)


# ---------------------------------------------------------------------------------------------------------
# Merger vectors beside the output: a new style multiplier is a re-export, not a new optimisation.


def save_mergers(path: Path, mergers: Mergers, content: LoraFile, style: LoraFile, provenance: Provenance) -> None:
    write_safetensors(path, *_mergers_payload(mergers, content, style, provenance), overwrite=True)


def _mergers_payload(
    mergers: Mergers, content: LoraFile, style: LoraFile, provenance: Provenance
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def check_merge_sources(content: LoraFile, style: LoraFile) -> None:
    """Both inputs must be for the same model, and not the same file twice."""
    if content.family != style.family:
        raise IncompatibleLorasError(f"{content.name} is for {content.family.label} but {style.name} is for {style.family.label}")
    if content.data_hash == style.data_hash:
        raise IncompatibleLorasError(f"{content.name} and {style.name} hold the same weights; pick two different LoRAs")
