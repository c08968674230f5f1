"""The Forge 2 host adapter against the Forge stand-in (tests/standins/forge.py), on the toy model.

Each job must leave Forge exactly as it found it: the same weights (bit for bit), flags, hooks and objects,
the user's LoRAs off while it runs and back at the next generation, the queue lock and progress state free.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.standins import forge as standins
from ziplora.errors import HostError
from ziplora.export import ExportOptions, export_merge
from ziplora.formats import Family, LayerKey
from ziplora.formats.families import reference_shapes
from ziplora.formats.lorafile import open_lora
from ziplora.hosts.base import SessionOptions
from ziplora.hosts.forge import ForgeHost
from ziplora.merge.patch import ZipLayer
from ziplora.metadata import Provenance
from ziplora.preview import PreviewSpec
from ziplora.progress import Progress
from ziplora.request import MergeRequest
from ziplora.service import MergeService
from ziplora.synthetic import attention_layers, write_random_lora

TE_KEYS = [
    LayerKey("te1", "text_model.encoder.layers.0.self_attn.q_proj"),
    LayerKey("te1", "text_model.encoder.layers.1.mlp.fc1"),
    LayerKey("te2", "text_model.encoder.layers.0.self_attn.v_proj"),
    LayerKey("te2", "text_model.encoder.layers.2.mlp.fc2"),
]


@pytest.fixture()
def forge(tmp_path: Path, toy_keys: list[LayerKey]):  # type: ignore[no-untyped-def]
    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    keys = [*toy_keys, *TE_KEYS]
    write_random_lora(folder / "subject.safetensors", keys, Family.TOYXL, rank=4, seed=1, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "sks shape"})  # fmt: skip
    write_random_lora(folder / "style.safetensors", keys, Family.TOYXL, rank=4, seed=2, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "zwx style"})  # fmt: skip
    write_random_lora(folder / "user.safetensors", keys, Family.TOYXL, rank=2, seed=3, scale=0.5)
    world = standins.install(folder)
    try:
        yield world
    finally:
        standins.uninstall()


@pytest.fixture()
def host() -> ForgeHost:
    return ForgeHost(families=(Family.TOYXL,), default_resolution=32, preview_steps=3)


def _request(**kw) -> MergeRequest:  # type: ignore[no-untyped-def]
    base = dict(content="subject", style="style", output_name="zipped", steps=5, sampling_steps=3, samples=1)
    base.update(kw)
    return MergeRequest(**base)  # type: ignore[arg-type]


def state_hash(module: torch.nn.Module) -> dict[str, bytes]:
    """Every parameter and buffer, by name, as bytes (0-dim ones too): equal dicts mean bit-identical."""
    return {k: v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in module.state_dict().items()}


def _models(world: standins.World) -> tuple[torch.nn.Module, torch.nn.Module]:
    sd = world.sd_model
    return sd.forge_objects_original.unet.model, sd.forge_objects_original.clip.cond_stage_model


def _hashes(world: standins.World) -> tuple[dict, dict]:
    unet, clip = _models(world)
    return state_hash(unet), state_hash(clip)


def _flags(world: standins.World) -> dict[str, bool]:
    unet, clip = _models(world)
    return {f"{i}.{n}": p.requires_grad for i, root in enumerate((unet, clip)) for n, p in root.named_parameters()}


def _assert_clean(world: standins.World) -> None:
    """No wrapped module, hook, instance forward or borrowed attribute left; lock, state, objects free."""
    for root in _models(world):
        for name, m in root.named_modules():
            assert not isinstance(m, ZipLayer), name
            assert not m._forward_pre_hooks and not m._forward_hooks, name
            assert "forward" not in m.__dict__, name
            if isinstance(m, (standins.GGUFLinear, standins.BnbLinear)):
                assert "in_features" not in m.__dict__ and "out_features" not in m.__dict__, name
    _assert_free(world)


def _assert_free(world: standins.World) -> None:
    assert not world.queue_lock.locked()
    state = world.state
    assert state.begun == state.ended and not state.interrupted and state.job == "" and state.job_count == 0
    assert sys.modules["modules_forge.main_thread"].waiting_list == []  # nothing sent to Forge's main loop


def _run(service: MergeService, request: MergeRequest, progress: Progress | None = None):  # type: ignore[no-untyped-def]
    return service.wait(service.submit_merge(request, progress), 300)


def _spy(world: standins.World, at_step: int, action=None) -> tuple[Progress, dict]:  # type: ignore[no-untyped-def]
    """A progress whose listener looks at Forge's model at one optimisation step (and may act there)."""
    seen: dict = {}
    progress = Progress()

    def listen(p: Progress) -> None:
        if p.stage.startswith("Optimising") and p.done == at_step and not seen:
            unet, clip = _models(world)
            seen["unet"] = {k.replace(".base.", "."): v for k, v in state_hash(unet).items()}
            seen["clip"] = {k.replace(".base.", "."): v for k, v in state_hash(clip).items()}
            seen["online"] = any(getattr(m, "forge_online_loras", None) for r in (unet, clip) for m in r.modules())
            seen["locked"] = world.queue_lock.locked()
            sd = world.sd_model
            seen["originals"] = (
                sd.forge_objects.unet is sd.forge_objects_original.unet and sd.forge_objects.clip is sd.forge_objects_original.clip
            )
            seen["forms"] = {type(m).__name__ for m in unet.modules() if isinstance(m, ZipLayer)}
            if action is not None:
                action()

    progress.add_listener(listen)
    return progress, seen


# -- a whole merge --------------------------------------------------------------------------------------------


def test_merge_writes_the_file_refreshes_forge_and_leaves_the_model_as_it_was(forge: standins.World, host: ForgeHost) -> None:
    forge.generate("a shape")  # Forge loads its (lazy) model at the first generation
    before, flags = _hashes(forge), _flags(forge)
    objects = forge.sd_model.forge_objects
    rescans = forge.rescans
    progress, seen = _spy(forge, at_step=2)
    status = _run(MergeService(host), _request(), progress)
    assert status.state == "done", status.error
    out = forge.lora_dir / "zipped.safetensors"
    assert out.is_file() and status.result["steps"] == 5
    assert "zipped" in forge.networks.available_networks and forge.rescans > rescans
    assert status.result["forms"] == {"fused": len(attention_layers(Family.TOYXL)) + len(TE_KEYS)}
    assert seen["locked"] and seen["originals"]
    assert _hashes(forge) == before and _flags(forge) == flags
    assert forge.sd_model.forge_objects is objects
    _assert_clean(forge)
    assert any(text.startswith("ZipLoRA: Optimising the mergers") for text in forge.state.seen)
    # the written file loads in Forge: every key matched, the image changes
    plain = forge.generate("a shape")
    zipped = forge.generate("a shape <lora:zipped:1>")
    assert float((plain - zipped).abs().mean()) > 1e-3


def test_fake_initial_model_is_loaded_by_the_job(forge: standins.World, host: ForgeHost) -> None:
    assert isinstance(forge.sd_model, standins.FakeInitialModel)
    with host.session(SessionOptions(), Progress()) as session:
        assert forge.model_loads == 1
        assert session.roots["unet"] is forge.sd_model.forge_objects_original.unet.model.diffusion_model
        assert session.roots["te1"] is forge.sd_model.forge_objects_original.clip.cond_stage_model.clip_l.transformer
        assert session.schedule.num_timesteps == 1000 and session.dtype == torch.float32
        assert session.latent_shape(32, 32) == (12, 16, 16)
        # Forge's Linear is no nn.Linear; the session still resolves and fuses it
        parent, attr = session.resolve(LayerKey("unet", attention_layers(Family.TOYXL)[0].path))
        layer = getattr(parent, attr)
        assert isinstance(layer, standins.ForgeLinear) and not isinstance(layer, torch.nn.Linear) and session.fusable(layer)
        assert not layer.weight.is_inference() and not layer.weight.requires_grad
    _assert_clean(forge)


def test_user_lora_is_off_during_the_job_and_back_at_the_next_generation(forge: standins.World, host: ForgeHost) -> None:
    free_image = forge.generate("a shape")
    free = _hashes(forge)
    with_lora = forge.generate("a shape <lora:user:1>")
    with_state = _hashes(forge)
    assert with_state[0] != free[0] and with_state[1] != free[1]  # baked into UNet and text encoders
    sd = forge.sd_model
    objects, marker = sd.forge_objects, sd.current_lora_hash
    loaders = (sd.forge_objects_original.unet.lora_loader, sd.forge_objects_original.clip.patcher.lora_loader)
    refreshes = [loader.refreshes for loader in loaders]
    reads = forge.file_reads
    progress, seen = _spy(forge, at_step=1)
    status = _run(MergeService(host), _request(), progress)
    assert status.state == "done", status.error
    assert seen["unet"] == free[0] and seen["clip"] == free[1]  # LoRA-free while the job ran
    assert sd.forge_objects is objects and sd.current_lora_hash == marker
    _assert_clean(forge)
    again = forge.generate("a shape <lora:user:1>")
    assert torch.equal(again, with_lora) and _hashes(forge) == with_state
    # one refresh took the LoRA off for the job, one put it back; no LoRA file read again
    assert [loader.refreshes for loader in loaders] == [n + 2 for n in refreshes]
    assert forge.file_reads == reads
    assert torch.equal(forge.generate("a shape"), free_image)


def test_on_the_fly_user_lora_is_detached_during_the_job(tmp_path: Path, forge: standins.World, host: ForgeHost) -> None:
    forge.online_lora = True  # as Forge does on fp8 / NF4 / GGUF models ("Diffusion in Low Bits ... (fp16 LoRA)")
    with_lora = forge.generate("a shape <lora:user:1>")
    unet, _ = _models(forge)
    assert any(getattr(m, "forge_online_loras", None) for m in unet.modules())
    progress, seen = _spy(forge, at_step=1)
    status = _run(MergeService(host), _request(), progress)
    assert status.state == "done", status.error
    assert seen["online"] is False
    assert torch.equal(forge.generate("a shape <lora:user:1>"), with_lora)
    assert any(getattr(m, "forge_online_loras", None) for m in unet.modules())


def test_side_path_with_gradient_checkpointing_through_forge_blocks(forge: standins.World, host: ForgeHost) -> None:
    forge.generate("a shape")
    before = _hashes(forge)
    status = _run(MergeService(host), _request(form="side", gradient_checkpointing=True))
    assert status.state == "done", status.error
    assert status.result["forms"] == {"side": len(attention_layers(Family.TOYXL)) + len(TE_KEYS)}
    assert status.result["similarity_after"] != status.result["similarity_before"]  # gradients reached the mergers
    assert _hashes(forge) == before
    _assert_clean(forge)


def _saved_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    """Bytes autograd keeps for backward while ``fn()`` runs (saved tensors, each counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_manual_cast_weight_copies_are_recomputed_not_kept_for_backward() -> None:
    """Found on a real Forge 2 (--always-cpu --unet-in-fp16): a layer that casts its fp16 weight to fp32 at each
    forward hands F.linear a fresh copy that autograd keeps until backward, the whole UNet again in fp32; the
    merge ran the machine out of memory. The session recomputes those casts in backward instead."""
    from ziplora.hosts.forge.autograd import recompute_casts as _recompute_casts
    from ziplora.hosts.forge.autograd import restore_forwards as _restore_forwards

    torch.manual_seed(0)
    layer = standins.ForgeLinear(256, 128)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    layer.weight.data = layer.weight.data.half()
    layer.bias.data = layer.bias.data.half()
    layer.requires_grad_(False)
    layer.parameters_manual_cast = True  # stored fp16, computed in the input's dtype
    x = torch.randn(4, 256, requires_grad=True)

    def run() -> None:
        layer(x).square().sum().backward()

    kept = _saved_bytes(run)
    grad = x.grad.clone()
    x.grad = None
    changed = _recompute_casts(torch.nn.Sequential(layer))
    assert changed == [layer]
    lean = _saved_bytes(run)
    assert kept >= 128 * 256 * 4 and lean < 128 * 256 * 4  # the fp32 weight copy is no longer kept
    assert torch.equal(x.grad, grad)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight.float(), layer.bias.float()))
    _restore_forwards(changed)
    assert "forward" not in layer.__dict__


def test_a_merge_over_manual_cast_layers_recomputes_them_and_puts_the_forwards_back(forge: standins.World, host: ForgeHost) -> None:
    forge.generate("a shape")
    unet, _ = _models(forge)
    cast = [m for m in unet.modules() if isinstance(m, standins.ForgeLinear)]
    for m in cast:
        m.parameters_manual_cast = True
    before = _hashes(forge)
    during: dict[str, int] = {}
    progress = Progress()

    def listen(p: Progress) -> None:
        if p.stage.startswith("Optimising") and "n" not in during:
            during["n"] = sum("forward" in m.__dict__ for m in cast)

    progress.add_listener(listen)
    status = _run(MergeService(host), _request(form="side"), progress)
    assert status.state == "done", status.error
    assert during["n"] == len(cast) > 0
    assert status.result["similarity_after"] != status.result["similarity_before"]  # gradients reached the mergers
    assert _hashes(forge) == before
    _assert_clean(forge)


def _unet_tensors(world: standins.World) -> dict[str, torch.Tensor]:
    """Every parameter and buffer object of Forge's UNet, by module path and name."""
    unet, _ = _models(world)
    return {
        f"{path}.{name}": t
        for path, module in unet.named_modules()
        for table in (module._parameters, module._buffers)
        for name, t in table.items()
        if t is not None
    }


def _object_state(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (t.is_inference(), t.requires_grad, t.dtype, t.device, type(t)) for k, t in tensors.items()}


def test_the_inference_tensors_forge_built_are_the_ones_it_has_after_a_job(forge: standins.World, host: ForgeHost) -> None:
    """Forge builds its UNet under inference mode and autograd refuses such tensors, so the job swaps them for
    ordinary copies; afterwards the model holds the very same tensor objects again (inference tensors, same
    values, flags, dtype, device and class), after a merge and after a failed one."""
    forge.generate("a shape")
    before = _unet_tensors(forge)
    state, hashes = _object_state(before), _hashes(forge)
    assert sum(t.is_inference() for t in before.values()) > len(before) // 2
    swapped: dict[str, bool] = {}
    progress = Progress()

    def listen(p: Progress) -> None:
        if p.stage.startswith("Optimising") and not swapped:
            now = _unet_tensors(forge)
            unet = [k for k, t in before.items() if k.startswith("diffusion_model.") and t.is_inference() and k in now]
            swapped["all"] = bool(unet) and all(now[k] is not before[k] for k in unet)

    progress.add_listener(listen)
    assert _run(MergeService(host), _request(), progress).state == "done"
    assert swapped == {"all": True}
    after = _unet_tensors(forge)
    assert after.keys() == before.keys() and [k for k in before if after[k] is not before[k]] == []
    assert _object_state(after) == state and _hashes(forge) == hashes

    def boom() -> None:
        raise RuntimeError("boom")

    progress, _ = _spy(forge, at_step=1, action=boom)
    assert _run(MergeService(host), _request(output_name="again"), progress).state == "failed"
    after = _unet_tensors(forge)
    assert [k for k in before if after[k] is not before[k]] == [] and _object_state(after) == state and _hashes(forge) == hashes
    _assert_clean(forge)


def test_ordinary_tensors_hold_no_second_copy_and_put_the_same_objects_back() -> None:
    from ziplora.hosts.forge.autograd import ordinary_tensors

    with torch.inference_mode():
        a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        b.weight = a.weight  # one tensor in two modules
        a.register_buffer("scale", torch.full((2,), 3.0))
    root = torch.nn.ModuleDict({"a": a, "b": b})
    originals = {"weight": a.weight, "a.bias": a.bias, "b.bias": b.bias, "scale": a.scale}
    with torch.inference_mode():
        values = {k: t.clone() for k, t in originals.items()}
    for attempt in ("job", "failure"):
        with pytest.raises(RuntimeError, match="boom") if attempt == "failure" else nullcontext():
            with ordinary_tensors(root) as swapped:
                assert swapped == 4 and b.weight is a.weight and not any(t.is_inference() for t in (a.weight, a.bias, b.bias, a.scale))
                assert all(t.numel() == 0 for t in originals.values())  # the originals hold no memory meanwhile
                x = torch.ones(4, requires_grad=True)
                (a(x) * a.scale.sum()).sum().backward()  # autograd saves them
                assert torch.allclose(x.grad, values["weight"].sum(0) * 6)
                if attempt == "failure":
                    raise RuntimeError("boom")
                b.bias.data = b.bias.data.double()  # as a Forge cast or move during the job would
        assert a.weight is originals["weight"] and b.weight is a.weight and a.bias is originals["a.bias"]
        assert b.bias is originals["b.bias"] and a.scale is originals["scale"]
        assert all(t.is_inference() for t in originals.values()) and b.bias.dtype == torch.float64
        assert all(torch.equal(t.float(), values[k]) for k, t in originals.items())


def test_v_prediction_schedule_and_unknown_predictions(forge: standins.World, host: ForgeHost) -> None:
    forge.factory = lambda: standins.build_engine(prediction_type="v_prediction")
    with host.session(SessionOptions(), Progress()) as session:
        assert session.schedule.prediction_type == "v_prediction"
    standins.uninstall()
    world = standins.install(forge.lora_dir, lambda: standins.build_engine(prediction_type="edm"))
    assert "predicts 'edm'" in _open(host)
    _assert_clean(world)


# -- failures leave nothing behind ----------------------------------------------------------------------------


def test_an_exception_mid_job_leaves_the_model_untouched(forge: standins.World, host: ForgeHost) -> None:
    forge.generate("a shape <lora:user:1>")
    before, flags = _hashes(forge), _flags(forge)

    def boom() -> None:
        raise RuntimeError("boom")

    progress, _ = _spy(forge, at_step=2, action=boom)
    status = _run(MergeService(host), _request(), progress)
    assert status.state == "failed" and "RuntimeError: boom" in status.error
    assert not (forge.lora_dir / "zipped.safetensors").exists()
    _assert_clean(forge)
    forge.generate("a shape <lora:user:1>")
    assert _hashes(forge) == before and _flags(forge) == flags


def test_forge_interrupt_button_stops_the_job_cleanly(forge: standins.World, host: ForgeHost) -> None:
    forge.generate("a shape")
    before, flags = _hashes(forge), _flags(forge)
    progress, _ = _spy(forge, at_step=2, action=forge.state.interrupt)
    status = _run(MergeService(host), _request(), progress)
    assert status.state == "interrupted", status.error
    assert not (forge.lora_dir / "zipped.safetensors").exists()
    assert _hashes(forge) == before and _flags(forge) == flags
    _assert_clean(forge)


# -- what is refused, in one line -----------------------------------------------------------------------------


def _open(host: ForgeHost, options: SessionOptions | None = None) -> str:
    with pytest.raises(HostError) as err:
        with host.session(options or SessionOptions(), Progress()):
            pass
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("engine", "words"),
    [(standins.StableDiffusion, "SD 1.x, not SDXL"), (standins.StableDiffusionXLRefiner, "SDXL refiner")],
)
def test_non_sdxl_checkpoints_are_refused(forge: standins.World, host: ForgeHost, engine: type, words: str) -> None:
    forge.factory = lambda: standins.build_engine(engine=engine)
    assert words in _open(host)
    _assert_clean(forge)


def test_old_forge_and_forks_are_refused(forge: standins.World, host: ForgeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "backend.patcher.lora", None)  # old Forge: ldm_patched, no backend.patcher.lora
        assert "no backend.patcher.lora" in _open(host) and "Forge 2" in _open(host)
    with monkeypatch.context() as m:
        m.delattr(sys.modules["backend.memory_management"], "load_models_gpu")
        assert "load_models_gpu" in _open(host)

    def fork() -> object:
        engine = standins.build_engine()
        del engine.forge_objects_original
        return engine

    forge.factory = fork
    assert "forge_objects_original" in _open(host)
    _assert_free(forge)


def test_cpu_swapped_unet_is_refused(forge: standins.World, host: ForgeHost) -> None:
    forge.cpu_swap = True
    forge.generate("a shape <lora:user:1>")
    objects = forge.sd_model.forge_objects
    assert "GPU Weights" in _open(host)
    assert forge.sd_model.forge_objects is objects
    _assert_clean(forge)


def test_a_precision_forge_does_not_compute_in_is_refused(forge: standins.World, host: ForgeHost) -> None:
    assert "computes this UNet in float32" in _open(host, SessionOptions(precision="fp16"))
    _assert_clean(forge)


# -- quantised layers -----------------------------------------------------------------------------------------


def test_quantised_layers_take_the_side_path(forge: standins.World, host: ForgeHost) -> None:
    quantised = [k.path for k in attention_layers(Family.TOYXL)[:2]]
    forge.factory = lambda: standins.build_engine(gguf=quantised)
    forge.generate("a shape")
    unet, _ = _models(forge)
    weights = [unet.diffusion_model.get_submodule(p).weight for p in quantised]
    before = _hashes(forge)
    status = _run(MergeService(host), _request())
    assert status.state == "done", status.error
    total = len(attention_layers(Family.TOYXL)) + len(TE_KEYS)
    assert status.result["forms"] == {"fused": total - 2, "side": 2}
    assert [unet.diffusion_model.get_submodule(p).weight for p in quantised] == weights  # left as they were
    assert _hashes(forge) == before
    _assert_clean(forge)


def test_quantised_layers_without_backward_are_refused_up_front(forge: standins.World, host: ForgeHost) -> None:
    forge.factory = lambda: standins.build_engine(bnb=[attention_layers(Family.TOYXL)[0].path])
    message = _open(host)
    assert "NF4/FP4" in message and "fp16" in message
    progress = Progress()
    status = _run(MergeService(host), _request(), progress)
    assert status.state == "failed" and "NF4/FP4" in status.error
    assert not progress.records  # refused before any optimisation, not after it
    _assert_clean(forge)


# -- Forge's memory management --------------------------------------------------------------------------------


def test_unet_unloaded_by_forge_mid_job_is_loaded_again(forge: standins.World, host: ForgeHost) -> None:
    forge.memory_pressure = True  # every load unloads what it was not told to keep (text encoders evict the UNet)
    forge.generate("a shape")
    before = _hashes(forge)
    status = _run(MergeService(host), _request())
    assert status.state == "done", status.error
    assert forge.unloads > 0
    assert sum(1 for names, _ in forge.load_calls if names == ["UnetPatcher"]) > 2
    assert _hashes(forge) == before
    _assert_clean(forge)


def test_the_job_asks_forge_for_training_memory(forge: standins.World, host: ForgeHost) -> None:
    with host.session(SessionOptions(gradient_checkpointing=True), Progress()):
        pass
    with host.session(SessionOptions(), Progress()):
        pass
    asked = [memory for names, memory in forge.load_calls if names == ["UnetPatcher", "ModelPatcher"]]
    assert len(asked) == 2 and 0 < asked[0] < asked[1]


# -- files ----------------------------------------------------------------------------------------------------


def test_rewriting_a_file_of_the_same_name_clears_forge_lora_cache(forge: standins.World, host: ForgeHost) -> None:
    service = MergeService(host)
    assert _run(service, _request()).state == "done"
    forge.generate("a shape <lora:zipped:1>")
    first = _hashes(forge)  # the weights with the file's LoRA baked in
    assert "zipped.safetensors" in forge.sd_model.current_lora_hash
    reads = forge.file_reads
    service.reexport(forge.lora_dir / "zipped.safetensors", 0.2)
    assert forge.sd_model.current_lora_hash is None
    assert forge.networks.load_lora_state_dict.cache_info().currsize == 0
    original = forge.sd_model.forge_objects_original
    assert original.unet.lora_loader.loaded_hash is None and original.clip.patcher.lora_loader.loaded_hash is None
    forge.generate("a shape <lora:zipped:1>")
    assert forge.file_reads == reads + 1
    rewritten = _hashes(forge)  # the new tensors, not the cached ones or the ones already merged
    assert rewritten[0] != first[0] and rewritten[1] != first[1]
    # the same as a Forge that never saw the first version
    standins.uninstall()
    fresh = standins.install(forge.lora_dir)
    fresh.generate("a shape <lora:zipped:1>")
    assert _hashes(fresh) == rewritten
    # a write of another file leaves the applied LoRAs alone
    marker = fresh.sd_model.current_lora_hash
    host.after_write(fresh.lora_dir / "other.safetensors")
    assert fresh.sd_model.current_lora_hash == marker


def test_lora_dir_and_list_come_from_forge(forge: standins.World, host: ForgeHost) -> None:
    assert host.lora_dir() == forge.lora_dir
    assert [p.stem for p in host.list_loras()] == ["style", "subject", "user"]
    assert host.name == "forge" and ForgeHost().families == (Family.SDXL,)
    assert ForgeHost().export_defaults.base_model_version == "sdxl_base_v1-0"


def test_settings_ziplora_reach_the_session_and_the_preview(forge: standins.World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings > ZipLoRA apply in Forge as in A1111, on the host the entry point builds (``webui_host()``, no
    arguments), read at each use so a change needs no restart."""
    import ziplora.hosts

    monkeypatch.setattr(ziplora.hosts, "running_in_forge", lambda: True)
    host = ziplora.hosts.webui_host()
    assert isinstance(host, ForgeHost)
    opts = sys.modules["modules.shared"].opts
    opts.ziplora_resolution, opts.ziplora_guidance, opts.ziplora_preview_steps, opts.ziplora_save_previews = 48, 3.5, 2, True
    with host.session(SessionOptions(), Progress()) as session:
        assert (session.default_resolution, session.default_guidance) == (48, 3.5)
    host.render(["a shape"], [(forge.lora_dir / "user.safetensors", 0.5)], 1, Progress())
    p = forge.renders[-1]
    assert (p.width, p.height, p.steps, p.cfg_scale, p.do_not_save_samples) == (48, 48, 2, 3.5, False)
    opts.ziplora_preview_steps, opts.ziplora_save_previews = 3, False
    host.render(["a shape"], [(forge.lora_dir / "user.safetensors", 0.5)], 1, Progress())
    assert forge.renders[-1].steps == 3 and forge.renders[-1].do_not_save_samples is True
    _assert_clean(forge)


# -- the queue, progress and the preview ----------------------------------------------------------------------


def test_job_waits_for_the_generation_holding_the_queue(forge: standins.World, host: ForgeHost) -> None:
    service = MergeService(host)
    progress = Progress()
    forge.queue_lock.acquire()  # a txt2img is running
    try:
        job = service.submit_merge(_request(), progress)
        deadline = time.monotonic() + 30
        while not progress.stage.startswith("Waiting for the WebUI") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert progress.stage.startswith("Waiting for the WebUI")
        time.sleep(0.1)
        assert service.status(job).state == "running" and not (forge.lora_dir / "zipped.safetensors").exists()
    finally:
        forge.queue_lock.release()
    assert service.wait(job, 300).state == "done"
    _assert_clean(forge)


def test_preview_renders_through_forge_txt2img(forge: standins.World, host: ForgeHost) -> None:
    service = MergeService(host)
    assert _run(service, _request()).state == "done"
    d = forge.lora_dir
    spec = PreviewSpec(d / "subject.safetensors", d / "style.safetensors", d / "zipped.safetensors",
                       "a sks shape", "a shape in zwx style", "a sks shape in zwx style", seed=3)  # fmt: skip
    status = service.wait(service.submit_preview(spec), 300)
    assert status.state == "done", status.error
    grid = service.result(status.id)
    assert grid.cells.shape == (12, 3, 32, 32)
    renders = forge.renders[-4:]
    assert all(p.do_not_save_samples and p.do_not_save_grid and p.closed for p in renders)
    assert all(p.seed == [3, 3, 3] and p.batch_size == 3 for p in renders)
    assert renders[0].prompt[0] == "a sks shape in zwx style <lora:subject:1>"
    assert renders[2].prompt[1] == "a sks shape <lora:subject:1> <lora:style:1>"
    assert float((grid.cells[0] - grid.cells[9]).abs().mean()) > 1e-3
    _assert_clean(forge)


def test_render_outside_a_job_takes_the_queue_itself(forge: standins.World, host: ForgeHost) -> None:
    images = host.render(["a shape"], [(forge.lora_dir / "user.safetensors", 0.5)], 1, Progress())
    assert images.shape == (1, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    _assert_clean(forge)


def test_render_refuses_a_file_forge_cannot_find(forge: standins.World, host: ForgeHost, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes((forge.lora_dir / "user.safetensors").read_bytes())
    with pytest.raises(HostError, match="has no elsewhere.safetensors"):
        host.render(["a shape"], [(elsewhere, 1.0)], 0, Progress())
    _assert_clean(forge)


def test_session_inside_another_thread_job_waits_for_it(forge: standins.World, host: ForgeHost) -> None:
    order: list[str] = []
    release = threading.Event()

    def hold() -> None:
        with host.job(Progress()):
            order.append("first")
            release.wait(10)
            order.append("first done")

    thread = threading.Thread(target=hold)
    thread.start()
    while not order:
        time.sleep(0.01)
    opened = threading.Thread(target=lambda: (host.session(SessionOptions(), Progress()).__enter__(), order.append("second")))
    opened.daemon = True
    opened.start()
    time.sleep(0.1)
    assert order == ["first"]
    release.set()
    thread.join(10)
    opened.join(10)
    assert order == ["first", "first done", "second"]


# -- the keys we write, under Forge's own key mapping ---------------------------------------------------------


def test_written_sdxl_keys_all_map_to_forge_sdxl_modules(tmp_path: Path) -> None:
    """A full SDXL merge (kohya's 722 UNet attention layers + text-encoder layers) loads in Forge with zero
    unmatched keys (Forge drops a file with more than 12)."""
    shapes = reference_shapes(Family.SDXL)
    assert shapes is not None
    te = [k for k in shapes if k.component in ("te1", "te2") and (k.path.endswith(("q_proj", "fc2")) or k.path == "text_projection")]
    keys = [*attention_layers(Family.SDXL), *te]
    content = write_random_lora(tmp_path / "c.safetensors", keys, Family.SDXL, rank=1, seed=1)
    style = write_random_lora(tmp_path / "s.safetensors", keys, Family.SDXL, rank=1, seed=2)
    out = tmp_path / "zipped.safetensors"
    export_merge(open_lora(content), open_lora(style), out, ExportOptions(write_sidecar=False), Provenance("direct"))
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # Forge's model state-dict keys: KModel ("diffusion_model." + sgm path) and JointTextEncoder (clip_l/clip_g)
    unet_keys = [f"diffusion_model.{k.path}.weight" for k in shapes if k.component == "unet"]
    prefix = {"te1": "clip_l.transformer.", "te2": "clip_g.transformer."}
    clip_keys = [f"{prefix[k.component]}{k.path}.weight" for k in shapes if k.component in prefix]
    lora_unet, rest = standins.forge_load_lora(tensors, standins.forge_unet_key_map(unet_keys))
    lora_clip, rest = standins.forge_load_lora(rest, standins.forge_clip_key_map(clip_keys))
    assert rest == {}
    assert len(lora_unet) == 722 and len(lora_clip) == len(te)
    assert all(kind == "lora" and values[2] is not None for kind, values in [*lora_unet.values(), *lora_clip.values()])
