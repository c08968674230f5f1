"""Opt-in: check what ziplora/hosts/forge/ assumes against a real Forge 2 checkout (no model is loaded).

Set ``ZIPLORA_FORGE_DIR`` to a checkout of lllyasviel/stable-diffusion-webui-forge (main). Without it every
test here is skipped. Most checks read Forge's source with ``ast`` (names, arguments, decorators, the few
statements the adapter depends on), so they need none of Forge's packages. Where a Forge module imports
with what the test environment has (the kohya key mapping, the main-thread queue, the FIFO lock, the UNet
class with three tiny import stubs), the real code runs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import sys
import threading
import types
import warnings
from pathlib import Path

import pytest
import torch

from tests.standins import forge as standins
from ziplora.export import ExportOptions, export_merge
from ziplora.formats import Family, LayerKey
from ziplora.formats.families import reference_shapes
from ziplora.formats.lorafile import open_lora
from ziplora.metadata import Provenance
from ziplora.synthetic import attention_layers, write_random_lora

FORGE = Path(os.environ["ZIPLORA_FORGE_DIR"]) if os.environ.get("ZIPLORA_FORGE_DIR") else None
pytestmark = pytest.mark.skipif(FORGE is None, reason="set ZIPLORA_FORGE_DIR to a Forge 2 checkout to run these")

SDXL_UNET_CONFIG = dict(  # what Forge's model guess (huggingface_guess, as ComfyUI's) gives for SDXL base
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], dropout=0, channel_mult=[1, 2, 4],
    conv_resample=True, dims=2, num_classes="sequential", use_checkpoint=False, num_heads=-1, num_head_channels=64,
    use_scale_shift_norm=False, resblock_updown=False, use_spatial_transformer=True, transformer_depth=[0, 0, 2, 2, 10, 10],
    context_dim=2048, disable_self_attentions=None, num_attention_blocks=None, disable_middle_self_attn=False,
    use_linear_in_transformer=True, adm_in_channels=2816, transformer_depth_middle=10,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
)  # fmt: skip


# -- reading Forge's source -----------------------------------------------------------------------------------


def _tree(rel: str) -> ast.Module:
    assert FORGE is not None
    path = FORGE / rel
    assert path.is_file(), f"Forge has no {rel}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # Forge's own invalid escapes
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(path.read_text(encoding="utf-8"))


def _find(tree: ast.AST, qualname: str) -> ast.AST:
    node: ast.AST = tree
    for part in qualname.split("."):
        found = [n for n in ast.iter_child_nodes(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part]
        assert found, f"{qualname}: no {part}"
        node = found[-1]
    return node


def _args(fn: ast.AST) -> list[str]:
    assert isinstance(fn, ast.FunctionDef)
    a = fn.args
    return [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]]


def _decorators(fn: ast.AST) -> list[str]:
    assert isinstance(fn, (ast.FunctionDef, ast.ClassDef))
    return [ast.unparse(d) for d in fn.decorator_list]


def _src(node: ast.AST) -> str:
    return ast.unparse(node)


def _fields(cls: ast.AST) -> set[str]:
    assert isinstance(cls, ast.ClassDef)
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


@pytest.fixture()
def forge_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    assert FORGE is not None
    monkeypatch.syspath_prepend(str(FORGE))
    return FORGE


# -- detection and the model ----------------------------------------------------------------------------------


def test_version_and_the_modules_the_adapter_detects() -> None:
    tree = _tree("modules_forge/forge_version.py")
    assigned = {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)
    }  # type: ignore[attr-defined]
    assert str(assigned["version"]).startswith("2.")
    for rel in ("backend/memory_management.py", "backend/patcher/lora.py", "modules_forge/main_thread.py"):
        assert (FORGE / rel).is_file(), rel  # type: ignore[operator]
    assert not (FORGE / "ldm_patched").exists()  # type: ignore[operator]  # old Forge's tree


def test_model_reload_is_lazy_and_returns_model_and_flag() -> None:
    tree = _tree("modules/sd_models.py")
    reload = _find(tree, "forge_model_reload")
    assert "torch.inference_mode()" in _decorators(reload) and _args(reload) == []
    returns = [n for n in ast.walk(reload) if isinstance(n, ast.Return)]
    assert all(isinstance(r.value, ast.Tuple) and len(r.value.elts) == 2 for r in returns)
    _find(tree, "FakeInitialModel")
    assert "self.sd_model = FakeInitialModel()" in _src(_find(tree, "SdModelData.__init__"))
    assert "model_data = SdModelData()" in _src(tree)


def test_sdxl_engine_objects_and_inference_mode_methods() -> None:
    tree = _tree("backend/diffusion_engine/sdxl.py")
    init = _src(_find(tree, "StableDiffusionXL.__init__"))
    for text in ("self.forge_objects = ForgeObjects(", "self.forge_objects_original = self.forge_objects.shallow_copy()",
                 "self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()", "self.is_sdxl = True",
                 "'clip_l'", "'clip_g'", "self.text_processing_engine_l", "self.embedder"):  # fmt: skip
        assert text in init, text
    for method in ("get_learned_conditioning", "encode_first_stage", "decode_first_stage"):
        assert "torch.inference_mode()" in _decorators(_find(tree, f"StableDiffusionXL.{method}")), method
    conditioning = _src(_find(tree, "StableDiffusionXL.get_learned_conditioning"))
    assert "memory_management.load_model_gpu(self.forge_objects.clip.patcher)" in conditioning  # forge_objects, not _original
    assert "is_negative_prompt" in conditioning and "crossattn=" in conditioning and "vector=" in conditioning
    refiner = _src(_find(tree, "StableDiffusionXLRefiner.__init__"))
    assert "'clip_g'" in refiner and "'clip_l'" not in refiner and "self.is_sdxl = True" in refiner  # is_sdxl alone is not enough
    base = _tree("backend/diffusion_engine/base.py")
    assert "self.current_lora_hash = str([])" in _src(_find(base, "ForgeDiffusionEngine.__init__"))
    _find(base, "ForgeObjects.shallow_copy")
    assert _args(_find(_tree("modules/prompt_parser.py"), "SdConditioning.__init__"))[:5] == [
        "self",
        "prompts",
        "is_negative_prompt",
        "width",
        "height",
    ]


def test_unet_call_schedule_and_what_breaks_autograd() -> None:
    unet = _tree("backend/nn/unet.py")
    forward = _find(unet, "IntegratedUNet2DConditionModel.forward")
    assert _args(forward)[:7] == ["self", "x", "timesteps", "context", "y", "control", "transformer_options"]
    block = _find(unet, "BasicTransformerBlock._forward")
    in_place = [n for n in ast.walk(block) if isinstance(n, ast.AugAssign) and _src(n) == "x += n"]
    assert len(in_place) == 2  # after attn1 and attn2: why norm1 / norm2 inputs are cloned
    assert "NotImplementedError" in _src(_find(unet, "checkpoint"))
    kmodel = _tree("backend/modules/k_model.py")
    apply = _src(_find(kmodel, "KModel.apply_model"))
    assert "self.diffusion_model(xc, t, context=context" in apply and "xc.to(dtype)" in apply
    init = _src(_find(kmodel, "KModel.__init__"))
    for attr in ("self.storage_dtype", "self.computation_dtype", "self.diffusion_model", "self.predictor"):
        assert attr in init, attr
    _find(kmodel, "KModel.memory_required")
    pred = _src(_find(_tree("backend/modules/k_prediction.py"), "Prediction.register_schedule"))
    assert "register_buffer('alphas_cumprod'" in pred
    loader = _tree("backend/loader.py")
    assert "torch.inference_mode()" in _decorators(_find(loader, "forge_loader"))  # why weights are inference tensors


# -- memory management and LoRA application ------------------------------------------------------------------


def test_memory_management_surface() -> None:
    tree = _tree("backend/memory_management.py")
    assert _args(_find(tree, "load_models_gpu")) == ["models", "memory_required", "hard_memory_preservation"]
    assert _args(_find(tree, "load_model_gpu")) == ["model"]
    assert "current_loaded_models = []" in _src(tree)
    assert "self.model_accelerated = False" in _src(_find(tree, "LoadedModel.__init__"))
    load = _src(_find(tree, "LoadedModel.model_load"))
    assert "self.model_accelerated = True" in load and "self.model.refresh_loras()" in load  # True means CPU swap
    assert "self.model is other.model" in _src(_find(tree, "LoadedModel.__eq__"))
    assert "unload_model_clones" in _src(_find(tree, "load_models_gpu"))


def test_lora_loader_and_patcher_surface() -> None:
    lora = _tree("backend/patcher/lora.py")
    refresh = _find(lora, "LoraLoader.refresh")
    assert "torch.inference_mode()" in _decorators(refresh)
    assert _args(refresh) == ["self", "lora_patches", "offload_device", "force_refresh"]
    body = _src(refresh)
    for text in ("hashes == self.loaded_hash", "del m.forge_online_loras", "self.backup[key] = weight.to(device=offload_device)",
                 "torch.nn.Parameter(weight, requires_grad=False)", "self.loaded_hash = hashes"):  # fmt: skip
        assert text in body, text
    assert "torch.inference_mode()" in _decorators(_find(lora, "merge_lora_to_weight"))
    base = _tree("backend/patcher/base.py")
    for method in ("clone", "is_clone", "add_patches", "refresh_loras", "memory_required"):
        _find(base, f"ModelPatcher.{method}")
    assert _args(_find(base, "ModelPatcher.add_patches")) == [
        "self",
        "filename",
        "patches",
        "strength_patch",
        "strength_model",
        "online_mode",
    ]
    assert "lora_identifier = (filename, strength_patch, strength_model, online_mode)" in _src(_find(base, "ModelPatcher.add_patches"))
    assert "model.lora_loader = LoraLoader(model)" in _src(_find(base, "ModelPatcher.__init__"))


def test_layer_classes() -> None:
    ops = _tree("backend/operations.py")
    linear = _find(ops, "ForgeOperations.Linear")
    assert isinstance(linear, ast.ClassDef) and [_src(b) for b in linear.bases] == ["torch.nn.Module"]
    assert "self.in_features = in_features" in _src(linear)
    conv = _find(ops, "ForgeOperations.Conv2d")
    assert [_src(b) for b in conv.bases] == ["torch.nn.Conv2d"]  # type: ignore[attr-defined]
    gguf = _find(ops, "ForgeOperationsGGUF.Linear")
    assert "in_features" not in _src(gguf)  # why the session lends it in/out_features for the job
    get = _src(_find(ops, "get_weight_and_bias"))
    assert "forge_online_loras" in get and "scale_weight" in get
    gguf_param = _tree("backend/operations_gguf.py")
    _find(gguf_param, "ParameterGGUF.copy_with_data")
    assert "self.gguf_cls" in _src(_find(gguf_param, "ParameterGGUF.__init__"))
    bnb = _tree("backend/operations_bnb.py")
    assert "in_features" not in _src(_find(bnb, "ForgeLoader4Bit"))
    _find(bnb, "ForgeParams4bit")


# -- the WebUI side ------------------------------------------------------------------------------------------


def test_queue_state_and_processing_surface() -> None:
    call_queue = _tree("modules/call_queue.py")
    assert "queue_lock = fifo_lock.FIFOLock()" in _src(call_queue)
    wrap = _src(_find(call_queue, "wrap_gradio_call"))
    assert "shared.state.interrupted = False" in wrap and "shared.state.job_count = 0" in wrap
    state = _tree("modules/shared_state.py")
    assert _args(_find(state, "State.begin")) == ["self", "job"]
    for method in ("end", "interrupt"):
        _find(state, f"State.{method}")
    fields = {t.id for n in _find(state, "State").body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}  # type: ignore[attr-defined]
    assert {
        "interrupted",
        "skipped",
        "stopping_generation",
        "job",
        "job_no",
        "job_count",
        "sampling_step",
        "sampling_steps",
        "textinfo",
    } <= fields
    processing = _tree("modules/processing.py")
    wanted = {"prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "sampler_name", "scheduler", "batch_size",
              "n_iter", "steps", "cfg_scale", "width", "height", "do_not_save_samples", "do_not_save_grid", "sd_model"}  # fmt: skip
    assert wanted <= _fields(_find(processing, "StableDiffusionProcessing"))
    _find(processing, "StableDiffusionProcessingTxt2Img")
    assert _args(_find(processing, "process_images")) == ["p"]
    inner = _src(_find(processing, "process_images_inner"))
    assert "p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()" in inner
    assert "p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()" in inner
    assert "isinstance(seed, list)" in inner  # one seed per prompt, given as a list
    api = _src(_tree("modules/api/api.py"))
    assert "with self.queue_lock:" in api and "main_thread" not in api  # the API generates off Forge's main thread


def test_main_thread_queue_swallows_exceptions(forge_path: Path) -> None:
    """Why the adapter does not run its job through ``run_and_wait_result``: only the result comes back."""
    main_thread = importlib.import_module("modules_forge.main_thread")
    try:
        loop = threading.Thread(target=main_thread.loop, daemon=True)
        loop.start()
        assert main_thread.run_and_wait_result(lambda: 7) == 7

        def fail() -> None:
            raise ValueError("lost")

        assert main_thread.run_and_wait_result(fail) is None and isinstance(main_thread.last_exception, ValueError)
    finally:
        sys.modules.pop("modules_forge.main_thread", None)
        sys.modules.pop("modules_forge", None)


def test_adapter_job_with_forge_fifo_lock(forge_path: Path, tmp_path: Path) -> None:
    """The adapter's non-blocking first try and blocking wait on Forge's real FIFOLock."""
    fifo = importlib.import_module("modules.fifo_lock")
    try:
        lock = fifo.FIFOLock()
        assert lock.acquire(blocking=False) is True and lock.acquire(blocking=False) is False
        lock.release()
        assert lock.acquire() is True
        lock.release()
    finally:
        sys.modules.pop("modules.fifo_lock", None)
        sys.modules.pop("modules", None)


def test_networks_caches_and_limits() -> None:
    tree = _tree("extensions-builtin/sd_forge_lora/networks.py")
    load = _find(tree, "load_lora_state_dict")
    assert "functools.lru_cache(maxsize=5)" in _decorators(load)
    _find(tree, "list_available_networks")
    networks = _src(_find(tree, "load_networks"))
    assert "current_sd.current_lora_hash == compiled_lora_targets_hash" in networks
    assert "current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()" in networks
    assert "len(lora_unmatch) > 12" in _src(_find(tree, "load_lora_for_models"))
    for name in ("available_networks", "networks_in_memory", "available_network_aliases", "forbidden_network_aliases"):
        assert f"{name} = {{}}" in _src(tree), name
    assert "'--lora-dir'" in _src(_tree("extensions-builtin/sd_forge_lora/preload.py")).replace('"', "'")


# -- real Forge code that runs here ---------------------------------------------------------------------------


def test_forge_key_mapping_takes_every_key_we_write(forge_path: Path, tmp_path: Path) -> None:
    """Forge's own ``model_lora_keys_unet`` / ``model_lora_keys_clip`` / ``load_lora`` on a full SDXL merge, and
    the stand-in's re-derivation against them."""
    lora = importlib.import_module("packages_3rdparty.comfyui_lora_collection.lora")
    try:
        shapes = reference_shapes(Family.SDXL)
        assert shapes is not None
        unet_keys = [f"diffusion_model.{k.path}.weight" for k in shapes if k.component == "unet"]
        prefix = {"te1": "clip_l.transformer.", "te2": "clip_g.transformer."}
        clip_keys = [f"{prefix[k.component]}{k.path}.weight" for k in shapes if k.component in prefix]
        kmodel = types.SimpleNamespace(
            state_dict=lambda: dict.fromkeys(unet_keys),
            diffusion_model=types.SimpleNamespace(config=dict(SDXL_UNET_CONFIG)),
            config=types.SimpleNamespace(huggingface_repo="stabilityai/stable-diffusion-xl-base-1.0"),
        )
        encoders = types.SimpleNamespace(state_dict=lambda: dict.fromkeys(clip_keys))
        _, unet_map = lora.model_lora_keys_unet(kmodel, {})
        _, clip_map = lora.model_lora_keys_clip(encoders, {})
        for ours, theirs in ((standins.forge_unet_key_map(unet_keys), unet_map), (standins.forge_clip_key_map(clip_keys), clip_map)):
            assert {k: theirs.get(k) for k in ours} == ours
        te = [k for k in shapes if k.component in ("te1", "te2")]
        keys = [*attention_layers(Family.SDXL), *[LayerKey(k.component, k.path) for k in te]]
        c = write_random_lora(tmp_path / "c.safetensors", keys, Family.SDXL, rank=1, seed=1)
        s = write_random_lora(tmp_path / "s.safetensors", keys, Family.SDXL, rank=1, seed=2)
        out = tmp_path / "zipped.safetensors"
        export_merge(open_lora(c), open_lora(s), out, ExportOptions(write_sidecar=False), Provenance("direct"))
        from safetensors.torch import load_file

        tensors = load_file(str(out))
        patches_unet, rest = lora.load_lora(tensors, unet_map)
        patches_clip, rest = lora.load_lora(rest, clip_map)
        assert rest == {} and len(patches_unet) == 722 and len(patches_clip) == len(te)
    finally:
        for name in [n for n in sys.modules if n.startswith("packages_3rdparty")]:
            sys.modules.pop(name, None)


def test_forge_sdxl_unet_has_our_module_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build Forge's ``IntegratedUNet2DConditionModel`` for SDXL on the meta device (three import stubs) and
    compare every Linear / conv with our SDXL module list: the names and shapes our files and patches use."""
    assert FORGE is not None
    config_utils = types.ModuleType("diffusers.configuration_utils")
    config_utils.ConfigMixin = type("ConfigMixin", (), {})  # type: ignore[attr-defined]
    config_utils.register_to_config = lambda f: f  # type: ignore[attr-defined]
    stubs = {
        "einops": types.SimpleNamespace(rearrange=None, repeat=None),
        "diffusers": types.ModuleType("diffusers"),
        "diffusers.configuration_utils": config_utils,
        "backend": types.ModuleType("backend"),
        "backend.attention": types.SimpleNamespace(attention_function=None),
    }
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("forge_real_unet", FORGE / "backend" / "nn" / "unet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.device("meta"):
        unet = module.IntegratedUNet2DConditionModel(**{k: (list(v) if isinstance(v, list) else v) for k, v in SDXL_UNET_CONFIG.items()})
    theirs = {name: tuple(m.weight.shape) for name, m in unet.named_modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() in (2, 4)}  # fmt: skip
    shapes = reference_shapes(Family.SDXL)
    assert shapes is not None
    ours = {k.path: tuple(v) for k, v in shapes.items() if k.component == "unet"}
    assert theirs == ours
    assert len(attention_layers(Family.SDXL)) == 722


def test_forge_sdxl_text_encoders_have_our_widths() -> None:
    assert FORGE is not None
    root = FORGE / "backend" / "huggingface" / "stabilityai" / "stable-diffusion-xl-base-1.0"
    for folder, (width, mlp, layers) in (("text_encoder", (768, 3072, 12)), ("text_encoder_2", (1280, 5120, 32))):
        config = json.loads((root / folder / "config.json").read_text())
        assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (width, mlp, layers)
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon" and scheduler["beta_schedule"] == "scaled_linear"


def test_real_backend_imports_if_its_packages_are_here(forge_path: Path) -> None:
    """Imports the backend modules themselves when Forge's requirements are installed (a real Forge venv)."""
    for package in ("psutil", "einops", "diffusers", "transformers", "gguf", "huggingface_guess"):
        pytest.importorskip(package, reason=f"Forge's {package} is not installed here")
    saved = dict(sys.modules)
    try:
        mm = importlib.import_module("backend.memory_management")
        importlib.import_module("backend.patcher.lora")
        assert callable(mm.load_models_gpu) and isinstance(mm.current_loaded_models, list)
    finally:
        for name in set(sys.modules) - set(saved):
            sys.modules.pop(name, None)


# -- bundled embeddings ----------------------------------------------------------------------------------------


def test_bundled_embeddings_with_forges_own_embedding_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``backend/text_processing/textual_inversion.py`` imports as it is: the session registers a LoRA's bundled
    embedding with two real databases (SDXL's ``text_processing_engine_l`` / ``_g``), the trigger is found in a
    prompt, and both come back exactly. Forge's LoRA extension never reads ``bundle_emb`` (docs/forge.md)."""
    from tests.standins.textual_inversion import bundle_embedding, word_ids
    from tests.test_host_bundled_embeddings import snapshot
    from ziplora.hosts.embeddings import bundled_embeddings
    from ziplora.hosts.forge.embeddings import bundled_embeddings_registered

    assert FORGE is not None
    spec = importlib.util.spec_from_file_location(
        "backend.text_processing.textual_inversion", FORGE / "backend/text_processing/textual_inversion.py"
    )
    ti = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(ti)  # type: ignore[union-attr]
    monkeypatch.setitem(sys.modules, "backend.text_processing.textual_inversion", ti)

    def tokenizer(texts: list[str], truncation: bool = True, add_special_tokens: bool = True) -> dict:
        assert truncation is False and add_special_tokens is False  # as EmbeddingDatabase.register_embedding_by_name asks
        return {"input_ids": word_ids(texts)}

    dbs = [ti.EmbeddingDatabase(tokenizer, 2048) for _ in range(2)]
    sd_model = types.SimpleNamespace(text_processing_engine_l=types.SimpleNamespace(embeddings=dbs[0]),
                                     text_processing_engine_g=types.SimpleNamespace(embeddings=dbs[1]))  # fmt: skip
    user = ti.create_embedding_from_data({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, "mystyle")
    for db in dbs:
        db.register_embedding(user)
    before = [snapshot(db) for db in dbs]
    path = write_random_lora(tmp_path / "subject.safetensors", attention_layers(Family.TOYXL), Family.TOYXL, rank=2, seed=1)
    tensors = bundle_embedding(path, "sksdog", seed=3, widths=(768, 1280))
    with bundled_embeddings_registered(sd_model, bundled_embeddings(open_lora(path))) as names:
        assert names == ["sksdog"]
        tokens = word_ids(["a sksdog in mystyle"])[0]
        for db in dbs:
            found = db.find_embedding_at_position(tokens, 1)[0]
            assert found.name == "sksdog" and found.shape == 2048 and found.vectors == 2
            assert torch.equal(found.vec["clip_g"], tensors["bundle_emb.sksdog.clip_g"])
            assert db.find_embedding_at_position(tokens, 3)[0] is user
    assert [snapshot(db)[0] for db in dbs] == [b[0] for b in before]
    lora_extension = (FORGE / "extensions-builtin/sd_forge_lora/networks.py").read_text(encoding="utf-8")
    assert "bundle_emb." not in lora_extension and "'bundle_emb'" not in lora_extension and '"bundle_emb"' not in lora_extension
    sdxl = (FORGE / "backend/diffusion_engine/sdxl.py").read_text(encoding="utf-8")
    for literal in ("self.text_processing_engine_l = ClassicTextProcessingEngine(", "self.text_processing_engine_g = ClassicTextProcessingEngine(",
                    "embedding_key='clip_g'", "embedding_expected_shape=2048"):  # fmt: skip
        assert literal in sdxl, literal
    classic = (FORGE / "backend/text_processing/classic_engine.py").read_text(encoding="utf-8")
    assert "self.embeddings = EmbeddingDatabase(tokenizer, embedding_expected_shape)" in classic
    assert "CLIPEmbeddingForTextualInversion(model_embeddings.token_embedding, self.embeddings" in classic


def test_settings_are_registered_as_forges_own_extensions_register_theirs() -> None:
    """The entry point registers Settings > ZipLoRA with ``shared.options_templates.update(shared.options_section(...))``
    (ziplora/hosts/settings.py); Forge has both, as A1111 does, and its LoRA extension registers its options so."""
    assert FORGE is not None
    shared = _tree("modules/shared.py")
    names = {
        t.id
        for n in shared.body
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Name)
    }
    assert {"options_templates", "options_section", "OptionInfo", "opts"} <= names
    assert _args(_find(_tree("modules/options.py"), "options_section")) == ["section_identifier", "options_dict"]
    text = (FORGE / "extensions-builtin/sd_forge_lora/scripts/lora_script.py").read_text(encoding="utf-8")
    assert "shared.options_templates.update(shared.options_section(" in text
