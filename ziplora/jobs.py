"""One merge job, end to end: files -> formats -> (host + inputs) -> merge -> export -> files.

The CLI, the tab and the API route all call :func:`run_merge` with a :class:`MergeRequest`.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ziplora.errors import HostError, InvalidRequestError, JobFailed, JobInterrupted, OutputExistsError
from ziplora.export import ExportOptions, ExportReport, check_merge_sources, export_merge, load_mergers
from ziplora.formats.factors import Factors
from ziplora.formats.families import Family
from ziplora.formats.keys import LayerKey
from ziplora.formats.lorafile import LoraFile, open_lora
from ziplora.hosts.base import ExportDefaults, Host, ModelSession, SessionOptions, available_memory, export_defaults_for
from ziplora.hosts.embeddings import bundled_embeddings
from ziplora.inputs import InputOptions, TrainingInputs, data_free_inputs, reference_inputs
from ziplora.lora_names import resolve_lora
from ziplora.merge.checkpointing import checkpointed
from ziplora.merge.optimize import NonFiniteLoss, ZipOptions, ZipResult, build_parts, optimize_mergers
from ziplora.merge.patch import Part, patch_layers
from ziplora.metadata import Provenance
from ziplora.progress import Progress
from ziplora.request import MergeRequest, ReexportRequest, check_output_name

log = logging.getLogger(__name__)

__all__ = ["MergeOutcome", "run_merge", "reexport", "resolve_lora", "lora_tag", "load_factors", "default_prompts", "export_options_for"]


@dataclass
class MergeOutcome:
    path: Path
    export: ExportReport
    zip: ZipResult | None
    content: str
    style: str
    trigger_words: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return lora_tag(self.path.stem, self.trigger_words)


def lora_tag(name: str, trigger_words: list[str], weight: float = 1.0) -> str:
    words = ", ".join(trigger_words)
    tag = f"<lora:{name}:{weight:g}>"
    return f"{tag} {words}" if words else tag


def default_prompts(host: Host, content: LoraFile, style: LoraFile) -> tuple[str, str]:
    make = getattr(host, "default_prompts", None)
    if make is not None:
        return make(content.trigger_words, style.trigger_words)  # type: ignore[no-any-return]
    subject = ", ".join(content.trigger_words) or "a photo"
    style_words = ", ".join(style.trigger_words) or "artwork"
    return subject, f"a picture, {style_words}"


def load_factors(content: LoraFile, style: LoraFile, progress: Progress) -> dict[LayerKey, tuple[Factors | None, Factors | None]]:
    """Every layer of both files as exact (or SVD) factors, for the optimisation."""
    keys = sorted(set(content.groups) | set(style.groups))
    progress.begin_stage("Reading the LoRAs", len(keys))
    out: dict[LayerKey, tuple[Factors | None, Factors | None]] = {}
    for i, key in enumerate(keys):
        if progress.interrupted():
            raise JobInterrupted("interrupted while reading the LoRAs; nothing was written")
        fc = content.layer(key).factors()[0] if key in content.groups else None
        fs = style.layer(key).factors()[0] if key in style.groups else None
        if fc is not None and fs is not None and fc.shape != fs.shape:
            from ziplora.errors import IncompatibleLorasError

            raise IncompatibleLorasError(f"layer {key.path}: content {list(fc.shape)} and style {list(fs.shape)} shapes differ")
        out[key] = (fc, fs)
        progress.advance(i + 1)
    return out


def _load_images(paths: tuple[str, ...], size: int) -> torch.Tensor:
    """Reference images as one batch: each centre-cropped to a square and resized to the job's resolution."""
    from ziplora.images import load_image

    images = []
    for p in paths:
        img = load_image(Path(p))
        h, w = img.shape[1:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = img[:, top : top + side, left : left + side][None]
        images.append(torch.nn.functional.interpolate(square, size=(size, size), mode="area" if side > size else "bilinear")[0])
    return torch.stack(images)


def _oom_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    for owner, name in ((torch, "OutOfMemoryError"), (torch.cuda, "OutOfMemoryError")):
        t = getattr(owner, name, None)
        if isinstance(t, type):
            types.append(t)
    return tuple(types)


def _weight_numel(part: Part) -> int:
    """Elements of the weight a part patches: out x in x kernel."""
    kernel = part.mid.shape[2:] if part.mid is not None else part.down.shape[2:]
    return int(part.up.shape[0] * part.down.shape[1] * math.prod(kernel))


def _choose_form(request: MergeRequest, session: ModelSession, parts: dict, notes: list[str]) -> str:  # type: ignore[type-arg]
    """ "auto": fused unless its weight copies would not fit. Without checkpointing the fused form keeps one
    W_eff per patched layer alive until backward (the patched layers' size again); the side path keeps only
    rank-sized activations. With checkpointing only one block's copies live at a time."""
    if request.form != "auto" or request.gradient_checkpointing:
        return request.form
    free = available_memory(session.device)
    if free is None:
        return "auto"
    extra = sum(_weight_numel(c or s) for c, s in parts.values()) * torch.empty((), dtype=session.dtype).element_size()
    if extra > free // 2:
        notes.append(
            f"the fused form would keep {extra / 2**30:.1f} GiB of weight copies for the backward pass with "
            f"{free / 2**30:.1f} GiB free: used the side path (turn on gradient checkpointing for the faster fused form)"
        )
        return "side"
    return "auto"


def _optimise(
    host: Host,
    request: MergeRequest,
    content: LoraFile,
    style: LoraFile,
    factors: dict[LayerKey, tuple[Factors | None, Factors | None]],
    prompts: tuple[str, str],
    precision: str,
    progress: Progress,
    timings: dict[str, float],
    notes: list[str],
) -> ZipResult:
    with ExitStack() as stack:
        embeddings = bundled_embeddings(content, style)  # registered by the host while prompts are encoded
        session = stack.enter_context(
            host.session(SessionOptions(precision, request.gradient_checkpointing, request.resolution, embeddings), progress)
        )

        def trainable(key: LayerKey) -> bool:
            return key.component == "unet" or (request.merge_text_encoders and session.text_encoder_grad)

        parts, bank = build_parts(factors, session.device, session.dtype, trainable)
        fusable = getattr(session, "fusable", None)  # optional: a host may veto the fused form per layer
        form = _choose_form(request, session, parts, notes)
        patches = stack.enter_context(patch_layers(session.resolve, parts, session.device, form, fusable))
        stack.enter_context(checkpointed(session.checkpoint_blocks(), request.gradient_checkpointing))
        resolution = request.resolution or session.default_resolution
        guidance = session.default_guidance if request.guidance is None else request.guidance
        options = InputOptions(resolution, resolution, request.samples, request.sampling_steps, guidance, request.seed)
        t0 = time.perf_counter()
        inputs: TrainingInputs
        if request.inputs == "images":
            inputs = reference_inputs(
                session, patches, prompts[0], prompts[1],
                _load_images(request.content_images, resolution), _load_images(request.style_images, resolution), options, progress,
            )  # fmt: skip
        else:
            inputs = data_free_inputs(session, patches, prompts[0], prompts[1], options, progress)
        timings["inputs"] = time.perf_counter() - t0
        te_merged = any(k.component != "unet" for k in bank.keys)
        zip_options = ZipOptions(
            steps=request.steps,
            lr=request.lr,
            lam=request.lam,
            similarity=request.similarity,
            reduction=request.reduction,
            stop_similarity=request.stop_similarity,
            seed=request.seed,
        )
        result = optimize_mergers(
            session.predict, patches, bank, inputs, zip_options, progress, encode=session.encode if te_merged else None
        )
        timings["optimise"] = result.seconds
        return result


def run_merge(request: MergeRequest, host: Host, progress: Progress, output_dir: Path | None = None) -> MergeOutcome:
    """Run one merge. Raises only ``ZipLoraError`` subclasses for expected failures; writes nothing on any.

    The output goes to the host's LoRA folder unless ``output_dir`` is given (the CLI's ``--out``).
    """
    t_start = time.perf_counter()
    request = request.validated()
    out = (output_dir or host.lora_dir()) / f"{request.output_name}.safetensors"
    if out.exists() and not request.overwrite:
        raise OutputExistsError(f"{out.name} already exists in {out.parent}; choose another name or tick overwrite")
    content = open_lora(resolve_lora(host, request.content), expect=host.families)
    style = open_lora(resolve_lora(host, request.style), expect=host.families)
    if out.resolve() in (content.path.resolve(), style.path.resolve()):
        raise InvalidRequestError(f"the output {out.name} would overwrite one of its own inputs; choose another name")
    check_merge_sources(content, style)
    timings: dict[str, float] = {}
    notes: list[str] = []
    zip_result: ZipResult | None = None
    defaults = host.export_defaults if len(host.families) == 1 else export_defaults_for(content.family)
    export_options = export_options_for(request, defaults)
    if request.method == "zip":
        prompts = (
            request.content_prompt or default_prompts(host, content, style)[0],
            request.style_prompt or default_prompts(host, content, style)[1],
        )
        factors = load_factors(content, style, progress)
        precision = request.precision
        oom = _oom_types()
        overflow: NonFiniteLoss | None = None  # set once a half-precision run overflowed and fp32 is being tried
        while True:
            try:
                zip_result = _optimise(host, request, content, style, factors, prompts, precision, progress, timings, notes)
                break
            except NonFiniteLoss as err:
                if err.dtype == torch.float32:
                    raise JobFailed(f"{err}; stopped cleanly, nothing was written") from None
                notes.append(f"{err}: retried in fp32")
                log.warning("%s: retrying in fp32", err)
                precision, overflow = "fp32", err
                progress.clear_records()  # the plot shows the run that counts, not the one that overflowed
            except HostError as err:
                if overflow is None:
                    raise
                # the host cannot run in fp32 (A1111 without --no-half, Forge in fp16): say why fp32 was tried
                raise JobFailed(f"{overflow}, and a retry in fp32 is not possible here ({err}); nothing was written") from None
            except oom:  # type: ignore[misc]
                raise JobFailed(
                    "out of GPU memory: turn on gradient checkpointing, lower the resolution or the samples; nothing was written"
                ) from None
        provenance = Provenance(
            method="ziplora",
            content_weight=request.content_weight,
            style_multiplier=request.style_multiplier,
            steps=zip_result.steps_run,
            lam=request.lam,
            lr=request.lr,
            similarity=request.similarity,
            final_similarity=round(zip_result.final_similarity, 6),
            inputs=request.inputs,
            target_rank=request.target_rank,
        )
        mergers = zip_result.mergers
    else:
        provenance = Provenance(
            method="direct", content_weight=request.content_weight, style_multiplier=request.style_multiplier,
            target_rank=request.target_rank,
        )  # fmt: skip
        mergers = None
    if progress.interrupted():
        raise JobInterrupted("interrupted before writing; nothing was written")
    progress.begin_stage("Writing the merged LoRA", len(set(content.groups) | set(style.groups)))
    t0 = time.perf_counter()
    report = export_merge(
        content, style, out, export_options, provenance, mergers,
        should_stop=progress.interrupted, on_layer=lambda done, total: progress.advance(done),
    )  # fmt: skip
    timings["export"] = time.perf_counter() - t0
    host.after_write(out)
    timings["total"] = time.perf_counter() - t_start
    words = list(dict.fromkeys([*content.trigger_words, *style.trigger_words]))
    return MergeOutcome(out, report, zip_result, content.name, style.name, words, timings, [*notes, *report.notes])


def export_options_for(request: MergeRequest, defaults: ExportDefaults, write_sidecar: bool = True) -> ExportOptions:
    """What the export takes from a request (weights, rank, overwrite) and from the model (the header's base model)."""
    return ExportOptions(
        content_weight=request.content_weight,
        style_multiplier=request.style_multiplier,
        target_rank=request.target_rank,
        overwrite=request.overwrite,
        base_model_version=defaults.base_model_version,
        architecture=defaults.architecture,
        resolution=defaults.resolution,
        sd_version=defaults.sd_version,
        write_sidecar=write_sidecar,
    )


def _header_defaults(old: LoraFile, defaults: ExportDefaults | None) -> ExportDefaults:
    """The base model a ZipLoRA output was written for, read back from its header (the host's where missing)."""
    fallback = defaults or ExportDefaults()
    sidecar_version = old.sidecar.get("sd version")
    return ExportDefaults(
        base_model_version=old.metadata.get("ss_base_model_version", fallback.base_model_version),
        architecture=old.metadata.get("modelspec.architecture", fallback.architecture),
        resolution=old.metadata.get("modelspec.resolution", "1024x1024"),
        sd_version=(sidecar_version if isinstance(sidecar_version, str) else None) or fallback.sd_version,
    )


def reexport(host: Host | None, output: Path, style_multiplier: float, progress: Progress | None = None) -> ExportReport:
    """Rewrite ``output`` from its saved mergers with a new style multiplier (seconds, no optimisation): the merge's
    request comes back from the saved mergers, takes the new multiplier and is checked like any other."""
    from ziplora.export import MERGERS_SUFFIX

    wanted = ReexportRequest(str(output), style_multiplier).validated()
    check_output_name(output.stem)
    mergers_path = output.with_suffix(MERGERS_SUFFIX)
    if not output.is_file():
        raise InvalidRequestError(f"{output}: no such merged LoRA")
    if not mergers_path.is_file():
        raise InvalidRequestError(f"{output.name} has no saved mergers ({mergers_path.name}); it was not made by a ZipLoRA merge")
    saved = load_mergers(mergers_path)
    families = host.families if host is not None else tuple(f for f in Family if f != Family.UNKNOWN)
    content = open_lora(saved.content_path, expect=families)
    style = open_lora(saved.style_path, expect=families)
    for lora, sha in ((content, saved.content_sha256), (style, saved.style_sha256)):
        if lora.data_hash != sha:
            raise InvalidRequestError(f"{lora.path.name} changed since the merge (its hash differs); merge again")
    old = open_lora(output, expect=families)
    prov = saved.provenance
    request = MergeRequest(
        content=str(saved.content_path), style=str(saved.style_path), output_name=output.stem, overwrite=True,
        content_weight=prov.content_weight, style_multiplier=wanted.style_multiplier, target_rank=prov.target_rank,
    ).validated()  # fmt: skip
    provenance = Provenance(**{**prov.__dict__, "style_multiplier": request.style_multiplier})
    defaults = _header_defaults(old, host.export_defaults if host is not None else None)
    # the sidecar may hold the user's edits: keep it
    options = export_options_for(request, defaults, write_sidecar=not output.with_suffix(".json").exists())
    report = export_merge(content, style, output, options, provenance, saved.mergers)
    if host is not None:
        host.after_write(output)
    return report
