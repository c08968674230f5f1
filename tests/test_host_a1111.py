"""The AUTOMATIC1111 adapter against the stand-in of A1111 v1.10.1 (tests/standins/a1111.py) on the toy model.

The adapter's logic is the same on SDXL; only ``families`` differs (toy LoRAs are ToyXL LoRAs), so the tests
use a subclass that takes ToyXL files. The last tests re-derive A1111's key mapping for real SDXL and load the
entry point (scripts/ziplora.py) into the stand-in.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import state_hash
from tests.standins.a1111 import build_world, installed, resolve_network_key, sdxl_network_layer_names
from ziplora.errors import HostError, JobInterrupted
from ziplora.formats.families import Family
from ziplora.formats.keys import LayerKey
from ziplora.hosts.a1111 import A1111Host, MultiheadAttentionAsLinears, strip_extra_networks
from ziplora.hosts.base import SessionOptions
from ziplora.hosts.toy import TOY_EXPORT
from ziplora.merge.patch import ZipLayer, patch_layers
from ziplora.preview import PreviewSpec, stack_parts
from ziplora.progress import Progress
from ziplora.request import MergeRequest
from ziplora.service import MergeService
from ziplora.synthetic import attention_layers, write_random_lora

REPO = Path(__file__).resolve().parents[1]


class ToyA1111Host(A1111Host):
    """The A1111 adapter taking ToyXL LoRAs (the stand-in's model is a ToyXL)."""

    families = (Family.TOYXL,)
    export_defaults = TOY_EXPORT


def _te_keys(component: str, layers: int = 3) -> list[LayerKey]:
    out = []
    for i in range(layers):
        base = f"text_model.encoder.layers.{i}"
        out += [LayerKey(component, f"{base}.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        out += [LayerKey(component, f"{base}.mlp.{p}") for p in ("fc1", "fc2")]
    return out


@pytest.fixture(scope="module")
def base_toy():
    from ziplora.toy.pipeline import untrained_toy

    return untrained_toy(seed=0)


@pytest.fixture()
def world(tmp_path: Path, base_toy):
    folder = tmp_path / "Lora"
    folder.mkdir()
    keys = attention_layers(Family.TOYXL) + _te_keys("te1") + _te_keys("te2")
    write_random_lora(folder / "subject.safetensors", keys, Family.TOYXL, rank=4, seed=1, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "sks shape"})  # fmt: skip
    write_random_lora(folder / "style.safetensors", keys, Family.TOYXL, rank=4, seed=2, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "zwx style"})  # fmt: skip
    w = build_world(copy.deepcopy(base_toy), folder)
    with installed(w):
        yield w


def _request(**kw) -> MergeRequest:  # type: ignore[no-untyped-def]
    base = dict(content="subject", style="style", output_name="zipped", steps=3, sampling_steps=2, samples=1)
    base.update(kw)
    return MergeRequest(**base)  # type: ignore[arg-type]


def _flags(model: nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


def _no_leftovers(world) -> None:  # type: ignore[no-untyped-def]
    """Nothing of a job left in the model or the WebUI's state."""
    model = world.sd_model
    assert not any(isinstance(m, (ZipLayer, MultiheadAttentionAsLinears)) for m in model.modules())
    assert all(isinstance(b.attn, nn.MultiheadAttention) for b in model.conditioner.embedders[1].wrapped.model.transformer.resblocks)
    assert not world.call_queue.queue_lock.locked()
    state = world.shared.state
    assert state.job == "" and state.job_count == 0 and not state.interrupted
    assert world.sd_hijack.current_optimizer.name == "Doggettx"


def _forward(world) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """One txt2img-like forward (text encoders and UNet) through the patched layers, as A1111 runs them."""
    model = world.sd_model
    cond = model.get_learned_conditioning(world.prompt_parser.SdConditioning(["a sks shape"], width=32, height=32))
    x = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([700]), dict(cond))


def _bake(world, name: str) -> None:  # type: ignore[no-untyped-def]
    """What a txt2img run with <lora:name:1> leaves behind: the LoRA loaded and baked into the weights."""
    world.networks.load_networks([name], [1.0], [1.0], None)
    _forward(world)


# ---------------------------------------------------------------------------------------------------------------
# a whole merge through the service


def test_zip_merge_writes_refreshes_and_leaves_the_model_bit_identical(world) -> None:  # type: ignore[no-untyped-def]
    model, state, lock = world.sd_model, world.shared.state, world.call_queue.queue_lock
    before, flags = state_hash(model), _flags(model)
    assert any(flags) and not all(flags)  # A1111: UNet trainable, text encoders frozen
    refreshes = world.networks.refreshes
    seen: list[tuple] = []

    def probe(p: Progress) -> None:
        te2 = model.conditioner.embedders[1].wrapped.model.transformer.resblocks[0].attn
        seen.append((p.stage, lock.locked(), state.job_count, state.textinfo, world.sd_hijack.current_optimizer.name,
                     type(te2).__name__, any(q.requires_grad for q in model.parameters())))  # fmt: skip

    progress = Progress()
    progress.add_listener(probe)
    service = MergeService(ToyA1111Host())
    status = service.wait(service.submit_merge(_request(), progress), 300)
    assert status.state == "done", status.error
    out = world.lora_dir / "zipped.safetensors"
    assert out.is_file() and Path(status.result["file"]) == out
    # the Lora extension's list was refreshed: <lora:zipped:1> works at once, every key reaches a module
    assert world.networks.refreshes > refreshes and "zipped" in world.networks.available_networks
    world.networks.load_networks(["zipped"])
    assert world.networks.unmatched == [] and len(world.networks.loaded_networks[0].modules) > 0
    world.networks.load_networks([])
    # during the job: the queue lock, SDP attention, te2 through the MHA view, nothing trainable
    optimising = [s for s in seen if s[0].startswith("Optimising")]
    assert optimising and all(s[1] for s in seen)
    assert {s[4] for s in optimising} == {"sdp"} and {s[5] for s in optimising} == {"MultiheadAttentionAsLinears"}
    assert not any(s[6] for s in optimising)
    assert any(s[2] == 1 and s[3] and s[3].startswith("ZipLoRA: Optimising") for s in seen)
    assert state.begun == ["ziplora"]
    # afterwards: bit-identical, flags and attention restored, lock free, state reset
    assert state_hash(model) == before and _flags(model) == flags
    _no_leftovers(world)
    assert not any("<" in text for batch in model.conditioning_batches for text in batch)


def test_progress_mirrors_into_shared_state(world) -> None:  # type: ignore[no-untyped-def]
    state = world.shared.state
    host = ToyA1111Host()
    progress = Progress()
    with host.job(progress):
        assert state.job == "ziplora" and state.job_count == 1 and state.textinfo == "ZipLoRA"
        progress.begin_stage("Optimising the mergers", 40)
        progress.advance(7, "loss 0.1")
        assert (state.job_count, state.job_no, state.sampling_steps, state.sampling_step) == (1, 0, 40, 7)
        assert state.textinfo.startswith("ZipLoRA: Optimising the mergers 7/40") and "loss 0.1" in state.textinfo
        state.interrupt()  # the WebUI's Interrupt button
        assert progress.interrupted()
    assert state.job == "" and not state.interrupted and not world.call_queue.queue_lock.locked()


# ---------------------------------------------------------------------------------------------------------------
# the built-in Lora's baked weights


def test_a_baked_builtin_lora_is_undone_for_the_job_and_the_users_state_comes_back(world) -> None:  # type: ignore[no-untyped-def]
    model, networks = world.sd_model, world.networks
    clean_hash, clean_out = state_hash(model), _forward(world)
    _bake(world, "style")
    baked_hash, baked_out = state_hash(model), _forward(world)
    assert baked_hash != clean_hash and not torch.equal(baked_out, clean_out)
    loaded = list(networks.loaded_networks)
    hypernetworks = world.shared.loaded_hypernetworks
    hypernetworks.append("a hypernetwork from the last generation")

    host = ToyA1111Host()
    with host.job(Progress()), host.session(SessionOptions(), Progress()) as session:
        assert networks.loaded_networks == [] and hypernetworks == []
        assert state_hash(model) == clean_hash  # every module really at its original weight
        x = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(5))
        cond = session.encode(["a sks shape"])
        given = dict(cond)
        with torch.no_grad():
            out = session.predict(x, torch.tensor([700]), cond)
        assert torch.equal(out, clean_out)
        # A1111's apply_model hijack writes to the cond dict it gets: ours is untouched
        assert cond.keys() == given.keys() and all(cond[k] is given[k] for k in cond)
    # the user's selection is back; A1111 re-applies it on the next forward, bit for bit
    assert networks.loaded_networks == loaded and hypernetworks == ["a hypernetwork from the last generation"]
    assert torch.equal(_forward(world), baked_out)
    assert state_hash(model) == baked_hash

    # the same through a whole merge
    service = MergeService(ToyA1111Host())
    status = service.wait(service.submit_merge(_request()), 300)
    assert status.state == "done", status.error
    assert networks.loaded_networks == loaded
    assert torch.equal(_forward(world), baked_out) and state_hash(model) == baked_hash
    _no_leftovers(world)


# ---------------------------------------------------------------------------------------------------------------
# failures and interrupts leave nothing behind


def _fail_at_step(p: Progress) -> None:
    if p.stage.startswith("Optimising") and p.done >= 1:
        raise RuntimeError("boom")


def test_an_exception_mid_job_leaves_the_model_bit_identical(world) -> None:  # type: ignore[no-untyped-def]
    model = world.sd_model
    _bake(world, "subject")
    before, flags, loaded = state_hash(model), _flags(model), list(world.networks.loaded_networks)
    progress = Progress()
    progress.add_listener(_fail_at_step)
    service = MergeService(ToyA1111Host())
    status = service.wait(service.submit_merge(_request(), progress), 300)
    assert status.state == "failed" and "RuntimeError: boom" in status.error
    assert not (world.lora_dir / "zipped.safetensors").exists()
    assert world.networks.loaded_networks == loaded and _flags(model) == flags
    _forward(world)  # the user's next generation re-applies the baked LoRA
    assert state_hash(model) == before
    _no_leftovers(world)


def test_interrupt_from_the_webui_stops_the_job(world) -> None:  # type: ignore[no-untyped-def]
    model, state = world.sd_model, world.shared.state
    before = state_hash(model)

    def press_interrupt(p: Progress) -> None:
        if p.stage.startswith("Optimising") and p.done >= 1:
            state.interrupt()

    progress = Progress()
    progress.add_listener(press_interrupt)
    service = MergeService(ToyA1111Host())
    status = service.wait(service.submit_merge(_request(steps=50), progress), 300)
    assert status.state == "interrupted" and "nothing was written" in status.error
    assert status.progress.done < 50
    assert not (world.lora_dir / "zipped.safetensors").exists()
    assert state_hash(model) == before
    _no_leftovers(world)


def _alternative_unet(world) -> None:  # type: ignore[no-untyped-def]
    world.sd_unet.current_unet = types.SimpleNamespace(option=types.SimpleNamespace(label="TensorRT"))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda w: setattr(w.sd_model, "is_sdxl", False), "is SD1; ZipLoRA merges SDXL LoRAs"),
        (lambda w: setattr(w.shared.cmd_opts, "lowvram", True), "--lowvram"),
        (_alternative_unet, "alternative UNet (TensorRT)"),
        (lambda w: setattr(w.devices, "fp8", True), "fp8"),
        (lambda w: setattr(w.sd_model, "is_ssd", True), "SSD-1B"),
        (lambda w: w.sd_model.conditioner.embedders.__delitem__(0), "1 text encoder(s)"),
    ],
    ids=["non-sdxl", "lowvram", "alternative-unet", "fp8", "ssd", "refiner"],
)
def test_refusals_are_one_line_host_errors_and_change_nothing(world, change, words: str) -> None:  # type: ignore[no-untyped-def]
    change(world)
    before = state_hash(world.sd_model)
    host = ToyA1111Host()
    with host.job(Progress()):
        with pytest.raises(HostError) as err:
            with host.session(SessionOptions(), Progress()):
                pass
    assert words in str(err.value) and "\n" not in str(err.value)
    assert state_hash(world.sd_model) == before and world.sd_hijack.applied == ["Automatic"]
    service = MergeService(host)
    status = service.wait(service.submit_merge(_request()), 60)
    assert status.state == "failed" and words in status.error


def test_a_precision_the_webui_does_not_run_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    host = ToyA1111Host()
    with pytest.raises(HostError, match="float16 was asked for .* runs the UNet in float32"):
        with host.session(SessionOptions(precision="fp16"), Progress()):
            pass
    with host.session(SessionOptions(precision="fp32"), Progress()) as session:
        assert session.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# the queue lock


def test_a_merge_waits_for_a_running_generation_and_can_be_interrupted_while_waiting(world) -> None:  # type: ignore[no-untyped-def]
    lock = world.call_queue.queue_lock
    service = MergeService(ToyA1111Host())
    assert lock.acquire()  # a txt2img generation holds the queue
    try:
        job = service.submit_merge(_request())
        time.sleep(0.3)
        status = service.status(job)
        assert status.state == "running" and status.progress.stage.startswith("Waiting for the WebUI")
        assert world.shared.state.begun == []
    finally:
        lock.release()
    assert service.wait(job, 300).state == "done"

    assert lock.acquire()
    try:
        job = service.submit_merge(_request(output_name="second"))
        time.sleep(0.2)
        service.interrupt(job)
        status = service.wait(job, 30)
        assert status.state == "interrupted" and "waiting for the WebUI's queue" in status.error
    finally:
        lock.release()
    assert not lock.locked()


def test_the_job_takes_the_queue_lock_that_generations_take(world) -> None:  # type: ignore[no-untyped-def]
    lock = world.call_queue.queue_lock
    host = ToyA1111Host()
    with host.job(Progress()):
        assert lock.locked()
        got = []
        t = threading.Thread(target=lambda: got.append(lock.acquire(blocking=False)))
        t.start()
        t.join()
        assert got == [False]
        with host.session(SessionOptions(), Progress()):  # inside the job: no second acquire (not reentrant)
            pass
    assert not lock.locked()
    with host.session(SessionOptions(), Progress()):  # alone: a job of its own
        assert lock.locked() and world.shared.state.job == "ziplora"
    assert not lock.locked() and world.shared.state.job == ""


# ---------------------------------------------------------------------------------------------------------------
# the second text encoder's fused attention


def test_mha_view_computes_what_the_fused_attention_computes() -> None:
    torch.manual_seed(0)
    for batch_first in (False, True):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        view = MultiheadAttentionAsLinears(mha)
        x = torch.randn(5, 2, 16) if not batch_first else torch.randn(2, 5, 16)
        causal = torch.full((5, 5), float("-inf")).triu(1)
        padding = torch.tensor([[False] * 4 + [True], [False] * 5])
        for kwargs in ({"attn_mask": causal}, {"attn_mask": causal.isinf()}, {"key_padding_mask": padding}, {}):
            want = mha(x, x, x, need_weights=False, **kwargs)[0]
            got = view(x, x, x, need_weights=False, **kwargs)[0]
            assert torch.allclose(got, want, atol=1e-6), kwargs
    assert view.q_proj.weight.data_ptr() == mha.in_proj_weight.data_ptr()  # a view, never a copy
    assert [n for n, _ in view.named_modules()] == ["", "q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.mark.parametrize("form", ["fused", "side"])
def test_patched_layers_give_what_a1111_gives_with_the_lora_in_the_prompt(world, form: str) -> None:  # type: ignore[no-untyped-def]
    """te1, te2 (q/k/v through the fused MHA, out_proj, MLP) and UNet layers patched by the core through the
    adapter's resolve() equal A1111's own application of the same file at weight 0.7."""
    host = ToyA1111Host()
    path = world.lora_dir / "subject.safetensors"
    x = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(5))
    with host.job(Progress()), host.session(SessionOptions(), Progress()) as session:
        parts = stack_parts([(path, 0.7)], host.families, session.device, session.dtype)
        assert {k.component for k in parts} == {"unet", "te1", "te2"}
        with patch_layers(session.resolve, parts, session.device, form) as patches:
            with patches.mode_of("content"), torch.no_grad():
                ours_cond = session.encode(["a sks shape <lora:subject:0.7>"])
                ours = session.predict(x, torch.tensor([700]), ours_cond)
    world.networks.load_networks(["subject"], [0.7], [0.7], None)
    model = world.sd_model
    theirs_cond = model.get_learned_conditioning(world.prompt_parser.SdConditioning(["a sks shape"], width=32, height=32))
    with torch.no_grad():
        theirs = model.apply_model(x, torch.tensor([700]), dict(theirs_cond))
    for k in ("crossattn", "vector"):
        assert torch.allclose(ours_cond[k], theirs_cond[k], atol=1e-5), k
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(theirs, _clean_prediction(world, x), atol=1e-3)  # the LoRA does something


def _clean_prediction(world, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    world.networks.load_networks([])
    model = world.sd_model
    cond = model.get_learned_conditioning(world.prompt_parser.SdConditioning(["a sks shape"], width=32, height=32))
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([700]), dict(cond))


def test_te2_layers_without_an_open_clip_counterpart_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    host = ToyA1111Host()
    with host.session(SessionOptions(), Progress()) as session:
        with pytest.raises(HostError, match="no counterpart in A1111's OpenCLIP"):
            session.resolve(LayerKey("te2", "text_projection"))
        with pytest.raises(HostError, match="no counterpart"):
            session.resolve(LayerKey("te2", "text_model.encoder.layers.99.mlp.fc1"))
        parent, attr = session.resolve(LayerKey("te2", "text_model.encoder.layers.1.mlp.fc2"))
        assert attr == "c_proj" and isinstance(getattr(parent, attr), nn.Linear)
    _no_leftovers(world)


# ---------------------------------------------------------------------------------------------------------------
# the preview through A1111's txt2img, files and lists


def test_preview_renders_through_txt2img_with_lora_tags_and_saves_nothing(world) -> None:  # type: ignore[no-untyped-def]
    model = world.sd_model
    clean = state_hash(model)
    service = MergeService(ToyA1111Host())
    assert service.wait(service.submit_merge(_request(method="direct")), 120).state == "done"
    folder = world.lora_dir
    spec = PreviewSpec(folder / "subject.safetensors", folder / "style.safetensors", folder / "zipped.safetensors",
                       "a sks shape", "a shape in zwx style", "a sks shape in zwx style", seed=3)  # fmt: skip
    status = service.wait(service.submit_preview(spec), 300)
    assert status.state == "done", status.error
    grid = service.result(status.id)
    assert grid.cells.shape == (12, 3, 32, 32) and 0 <= float(grid.cells.min()) and float(grid.cells.max()) <= 1
    calls = world.processing.calls
    assert len(calls) == 4
    assert calls[2].prompt[0] == "a sks shape in zwx style <lora:subject:1><lora:style:1>"
    assert calls[3].prompt[1] == "a sks shape <lora:zipped:1>"
    for p in calls:
        assert p.do_not_save_samples and p.do_not_save_grid and p.closed
        assert p.seed == [3, 3, 3] and p.width == 32 and p.steps == 4 and p.override_settings == {"sd_lora": "None"}
    assert world.saved_images == []
    assert float((grid.cells[0] - grid.cells[3]).abs().mean()) > 1e-3  # rows differ: the LoRAs act
    # un-stuck: no LoRA selected; A1111 puts the weights back on the next forward
    assert world.networks.loaded_networks == []
    _forward(world)
    assert state_hash(model) == clean
    _no_leftovers(world)


def test_previews_are_saved_when_the_setting_says_so(world) -> None:  # type: ignore[no-untyped-def]
    world.shared.opts.ziplora_save_previews = True
    host = ToyA1111Host()
    with host.job(Progress()):
        images = host.render(["a shape", "a sks shape"], [(world.lora_dir / "subject.safetensors", 0.5)], 1, Progress())
    assert images.shape == (2, 3, 32, 32) and len(world.saved_images) == 2
    assert world.processing.calls[0].prompt == ["a shape <lora:subject:0.5>", "a sks shape <lora:subject:0.5>"]


def test_our_interrupt_stops_a_preview_image_midway(world) -> None:  # type: ignore[no-untyped-def]
    world.shared.opts.ziplora_preview_steps = 400
    host = ToyA1111Host()
    progress = Progress()
    progress.interrupt()  # the tab's or the API's interrupt, before or during the render
    with host.job(progress), pytest.raises(JobInterrupted, match="preview interrupted"):
        host.render(["a shape"], [(world.lora_dir / "subject.safetensors", 1.0)], 0, progress)
    assert world.shared.state.sampling_step < 399  # the WebUI's sampler stopped early
    assert world.networks.loaded_networks == [] and not world.shared.state.interrupted


def test_render_refuses_a_file_the_lora_extension_reaches_under_another_path(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = elsewhere / "subject.safetensors"
    other.write_bytes((world.lora_dir / "subject.safetensors").read_bytes())
    host = ToyA1111Host()
    with host.job(Progress()), pytest.raises(HostError, match="two LoRA files are named 'subject'"):
        host.render(["a shape"], [(other, 1.0)], 0, Progress())


def test_lora_folders_list_and_refresh(world) -> None:  # type: ignore[no-untyped-def]
    host = ToyA1111Host()
    assert host.lora_dir() == world.lora_dir
    lyco = Path(world.shared.cmd_opts.lyco_dir_backcompat)
    lyco.mkdir()
    (lyco / "old.safetensors").write_bytes((world.lora_dir / "style.safetensors").read_bytes())
    (world.lora_dir / "sub").mkdir()
    (world.lora_dir / "sub" / "nested.safetensors").write_bytes((world.lora_dir / "subject.safetensors").read_bytes())
    assert [p.name for p in host.list_loras()] == ["nested.safetensors", "old.safetensors", "style.safetensors", "subject.safetensors"]
    world.networks.networks_in_memory["style"] = object()
    refreshes = world.networks.refreshes
    host.after_write(world.lora_dir / "style.safetensors")
    assert "style" not in world.networks.networks_in_memory and world.networks.refreshes == refreshes + 1
    assert host.default_prompts(["sks dog"], ["zwx style"]) == ("a photo of sks dog", "a picture, zwx style")


def test_a_rewritten_file_is_not_left_baked_with_its_old_tensors(world) -> None:  # type: ignore[no-untyped-def]
    """Found while checking re-exports against real A1111 v1.10.1 (networks.py network_apply_weights): its
    default path compares only (name, multipliers), so after a re-export under the same name the next
    <lora:NAME:1> generation kept the OLD tensors baked in, although load_networks re-read the file (its mtime
    changed). after_write puts the baked modules back. (The CPU e2e run uses lora_functional, which does not
    bake; see docs/real-webui.md.)"""
    service = MergeService(ToyA1111Host())
    assert service.wait(service.submit_merge(_request()), 300).state == "done"
    out = world.lora_dir / "zipped.safetensors"
    _bake(world, "zipped")  # a txt2img with <lora:zipped:1>: baked in place
    old = _forward(world)
    time.sleep(0.01)  # a new mtime for the rewrite
    service.reexport(out, 0.25)
    world.networks.load_networks(["zipped"], [1.0], [1.0], None)  # the next txt2img with <lora:zipped:1>
    after = _forward(world)
    # reference: the rewritten file applied to clean weights
    world.networks.load_networks([])
    clean = _forward(world)
    world.networks.load_networks(["zipped"], [1.0], [1.0], None)
    fresh = _forward(world)
    assert not torch.equal(old, fresh)
    assert torch.equal(after, fresh)
    # and a generation without the LoRA finds clean weights
    world.networks.load_networks([])
    assert torch.equal(_forward(world), clean)


def test_strip_extra_networks() -> None:
    assert strip_extra_networks("a <lora:x:1> sks  dog<hypernet:y:0.5>") == "a sks dog"


# ---------------------------------------------------------------------------------------------------------------
# A1111's key mapping for real SDXL: every key of a full merge reaches a module


def test_every_key_of_a_full_sdxl_merge_maps_to_a_module_of_sdxl(tmp_path: Path) -> None:
    """networks.py load_network's rules (split at the first dot; lora_unet -> diffusion_model;
    lora_te1_text_model -> 0_transformer_text_model; lora_te2 via OpenCLIP names and the (.*)_([qkv]_proj)$
    rule) over the names assign_network_names_to_compvis_modules gives real SDXL base."""
    from ziplora.export import ExportOptions, export_merge
    from ziplora.formats.lorafile import open_lora
    from ziplora.formats.safetensors_io import SafetensorsFile
    from ziplora.metadata import Provenance

    unet = attention_layers(Family.SDXL)
    assert len(unet) == 722
    te1 = [k for i in (0, 11) for k in _te_keys("te1", 12) if f"layers.{i}." in k.path]
    te2 = [k for i in (0, 31) for k in _te_keys("te2", 32) if f"layers.{i}." in k.path]
    a = write_random_lora(tmp_path / "a.safetensors", unet + te1 + te2, Family.SDXL, rank=1, seed=1)
    b = write_random_lora(tmp_path / "b.safetensors", unet[:100] + te2, Family.SDXL, rank=1, seed=2)
    out = tmp_path / "merged.safetensors"
    export_merge(open_lora(a), open_lora(b), out, ExportOptions(), Provenance(method="direct"))
    names = sdxl_network_layer_names()
    mapping = dict.fromkeys(names, object())
    module_keys = {k.partition(".")[0] for k in SafetensorsFile(out).tensors}
    assert len(module_keys) == 722 + len(te1) + len(te2)
    resolved = {}
    for key in module_keys:
        found = resolve_network_key(key, mapping)
        assert found is not None, f"A1111 would drop {key}"
        resolved[key] = found[0]
    assert (
        resolved["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
        == "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert resolved["lora_te1_text_model_encoder_layers_11_mlp_fc2"] == "0_transformer_text_model_encoder_layers_11_mlp_fc2"
    assert resolved["lora_te2_text_model_encoder_layers_31_mlp_fc1"] == "1_model_transformer_resblocks_31_mlp_c_fc"
    assert resolved["lora_te2_text_model_encoder_layers_0_self_attn_out_proj"] == "1_model_transformer_resblocks_0_attn_out_proj"
    # q/k/v reach the fused MHA; A1111 applies them only as a complete q, k, v, out set, which each block has
    mha = [v for v in resolved.values() if v.startswith("1_") and v.endswith(("_q_proj", "_k_proj", "_v_proj"))]
    assert mha and all(v.rsplit("_", 2)[0] in names for v in mha)
    for block in {v.rsplit("_", 2)[0] for v in mha}:
        assert {f"{block}_{p}" for p in ("q_proj", "k_proj", "v_proj")} <= set(resolved.values())
        assert f"{block}_out_proj" in resolved.values()


# ---------------------------------------------------------------------------------------------------------------
# the entry point


def _load_entry_point() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("ziplora.py", REPO / "scripts" / "ziplora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture()
def entry(world, monkeypatch):  # type: ignore[no-untyped-def]
    """The entry point's view of the WebUI: the stand-in, a light gradio and a stand-in tab builder."""
    import ziplora

    monkeypatch.delattr(ziplora, "_webui_service", raising=False)
    gradio = types.ModuleType("gradio")
    gradio.Slider = type("Slider", (), {})
    monkeypatch.setitem(sys.modules, "gradio", gradio)
    built = []
    ui = types.ModuleType("ziplora.ui")
    ui.build_tab = lambda service, *, standalone=False: built.append((service, standalone)) or "blocks"
    monkeypatch.setitem(sys.modules, "ziplora.ui", ui)
    yield world, built, ui
    monkeypatch.delattr(ziplora, "_webui_service", raising=False)


def test_entry_point_registers_settings_tab_and_api(entry, capsys) -> None:  # type: ignore[no-untyped-def]
    from fastapi import FastAPI

    world, built, _ = entry
    _load_entry_point()
    templates = world.shared.options_templates
    assert {"ziplora_resolution", "ziplora_guidance", "ziplora_preview_steps", "ziplora_save_previews"} <= set(templates)
    assert all(templates[k].section == ("ziplora", "ZipLoRA") for k in templates if k.startswith("ziplora_"))
    assert world.shared.opts.ziplora_preview_steps == 4 and world.shared.opts.ziplora_save_previews is False
    tabs = world.script_callbacks.ui_tabs_callback()
    assert tabs == [("blocks", "ZipLoRA", "ziplora")]
    service, standalone = built[0]
    assert isinstance(service, MergeService) and isinstance(service.host, A1111Host) and standalone is False
    app = FastAPI()
    world.script_callbacks.app_started_callback(None, app)  # --nowebui: no gradio demo
    paths = {r.path for r in app.routes}
    assert {"/ziplora/v1/merge", "/ziplora/v1/jobs/{job_id}", "/ziplora/v1/loras"} <= paths
    # a second import (Reload UI) keeps the one service
    _load_entry_point()
    world.script_callbacks.callbacks["ui_tabs"][-1]()
    assert built[-1][0] is service
    assert capsys.readouterr().out == ""


def test_entry_point_failures_print_one_line_and_never_raise(entry, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import ziplora.hosts

    world, _, ui = entry
    ui.build_tab = lambda service, *, standalone=False: (_ for _ in ()).throw(ValueError("no gradio 5"))
    _load_entry_point()
    assert world.script_callbacks.ui_tabs_callback() == []
    assert capsys.readouterr().out == "ZipLoRA: the ZipLoRA tab could not be built: ValueError: no gradio 5\n"

    monkeypatch.delattr(ziplora, "_webui_service", raising=False)
    monkeypatch.setattr(ziplora.hosts, "webui_host", lambda: (_ for _ in ()).throw(RuntimeError("broken install")))
    _load_entry_point()
    out = capsys.readouterr().out
    assert out == "ZipLoRA: the extension failed to load and is inactive: RuntimeError: broken install\n"
