"""Our assumptions about AUTOMATIC1111, checked against a real checkout (opt-in, no model load, no GPU).

    ZIPLORA_WEBUI_DIR=/path/to/stable-diffusion-webui python -m pytest -m e2e tests/test_a1111_real.py

Most A1111 modules cannot be imported without its whole environment (modules.shared needs diskcache,
prompt_parser needs lark, networks.py needs omegaconf, sgm and ldm checkouts). So the functions the adapter
relies on are read out of the real files with ``ast`` and executed with small stubs for their globals: A1111's
own key mapping (networks.py load_network, convert_diffusers_name_to_compvis), module naming
(assign_network_names_to_compvis_modules), weight baking and restoring (network_apply_weights,
network_restore_weights_from_backup), SdConditioning, options_section / OptionInfo; fifo_lock.py imports as
it is. The rest are checks of names, signatures and literals the adapter uses.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import state_hash

WEBUI = os.environ.get("ZIPLORA_WEBUI_DIR")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not WEBUI or not (Path(WEBUI) / "extensions-builtin" / "Lora" / "networks.py").is_file(),
        reason="set ZIPLORA_WEBUI_DIR to an AUTOMATIC1111 checkout",
    ),  # fmt: skip
]
NETWORKS = "extensions-builtin/Lora/networks.py"


def _text(rel: str) -> str:
    return (Path(WEBUI) / rel).read_text(encoding="utf-8")  # type: ignore[arg-type]


def _top(rel: str) -> dict[str, ast.stmt]:
    """Top-level functions, classes and simple assignments of a file, by name."""
    out: dict[str, ast.stmt] = {}
    with warnings.catch_warnings():  # A1111's sources have a few invalid escape sequences
        warnings.simplefilter("ignore", DeprecationWarning)
        body = ast.parse(_text(rel)).body
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _load(rel: str, names: list[str], namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute the named top-level definitions of a real file in ``namespace`` (their globals)."""
    top = _top(rel)
    module = ast.Module(body=[top[n] for n in names], type_ignores=[])
    exec(compile(module, str(Path(WEBUI) / rel), "exec"), namespace)  # noqa: S102 - the user's own checkout
    return namespace


def _source(rel: str, name: str) -> str:
    text = _text(rel)
    return ast.get_source_segment(text, _top(rel)[name]) or ""


def _args(rel: str, name: str) -> list[str]:
    node = _top(rel)[name]
    assert isinstance(node, ast.FunctionDef), name
    return [a.arg for a in node.args.args]


def _sdxl_module_keys() -> list[str]:
    """Every kohya module key an SDXL LoRA can have: every UNet Linear / conv, every CLIP-L and bigG layer."""
    from ziplora.formats.families import Family, reference_shapes
    from ziplora.formats.keys import kohya_name

    shapes = reference_shapes(Family.SDXL)
    assert shapes is not None
    return sorted(kohya_name(k) for k in shapes if k.path != "text_projection")


# ---------------------------------------------------------------------------------------------------------------
# networks.py: key mapping, naming, baking


def _networks_namespace(mapping: dict[str, Any], state_dicts: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Globals for networks.py's functions: stubs where they touch the rest of the WebUI."""

    class Accept:
        def create_module(self, net: Any, weights: Any) -> Any:
            return weights

    shared = types.SimpleNamespace(sd_model=types.SimpleNamespace(network_layer_mapping=mapping), opts=types.SimpleNamespace())
    return {
        "re": re, "os": os, "logging": logging, "torch": torch, "Union": Any,
        "shared": shared,
        "network": types.SimpleNamespace(
            Network=lambda name, on_disk: types.SimpleNamespace(name=name, modules={}, bundle_embeddings={}),
            NetworkWeights=lambda **kw: types.SimpleNamespace(**kw),
        ),
        "sd_models": types.SimpleNamespace(read_state_dict=lambda filename: state_dicts[filename]),
        "module_types": [Accept()],
        "textual_inversion": types.SimpleNamespace(),
        "devices": types.SimpleNamespace(cpu=torch.device("cpu")),
        "modules": types.SimpleNamespace(models=types.SimpleNamespace(sd3=types.SimpleNamespace(mmdit=types.SimpleNamespace(QkvLinear=type("QkvLinear", (), {}))))),
        "loaded_networks": [],
        "extra_network_lora": types.SimpleNamespace(errors={}),
    }  # fmt: skip


def test_convert_diffusers_name_to_compvis_changes_only_te2_names_as_the_standin_says() -> None:
    from tests.standins.a1111 import RE_X_PROJ, convert_diffusers_name_to_compvis

    ns = _load(NETWORKS, ["re_digits", "re_x_proj", "re_compiled", "suffix_conversion", "convert_diffusers_name_to_compvis"], {"re": re})
    keys = _sdxl_module_keys()
    assert len(keys) > 1000
    for key in keys:
        assert ns["convert_diffusers_name_to_compvis"](key, False) == convert_diffusers_name_to_compvis(key), key
    assert ns["re_x_proj"].pattern == RE_X_PROJ.pattern


def test_load_network_maps_every_key_of_a_full_sdxl_merge_as_the_standin_does(tmp_path: Path) -> None:
    """The real load_network, run over a merged file's keys against SDXL base's module names."""
    from safetensors.torch import load_file

    from tests.standins.a1111 import resolve_network_key, sdxl_network_layer_names
    from tests.test_host_a1111 import _te_keys
    from ziplora.export import ExportOptions, export_merge
    from ziplora.formats.families import Family
    from ziplora.formats.lorafile import open_lora
    from ziplora.metadata import Provenance
    from ziplora.synthetic import attention_layers, write_random_lora

    keys = attention_layers(Family.SDXL) + _te_keys("te1", 12) + _te_keys("te2", 32)
    a = write_random_lora(tmp_path / "a.safetensors", keys, Family.SDXL, rank=1, seed=1)
    b = write_random_lora(tmp_path / "b.safetensors", keys[:200], Family.SDXL, rank=1, seed=2)
    out = tmp_path / "merged.safetensors"
    export_merge(open_lora(a), open_lora(b), out, ExportOptions(), Provenance(method="direct"))
    mapping = {name: object() for name in sdxl_network_layer_names()}
    ns = _networks_namespace(mapping, {str(out): load_file(str(out))})
    _load(NETWORKS, ["re_digits", "re_x_proj", "re_compiled", "suffix_conversion", "convert_diffusers_name_to_compvis", "load_network"], ns)
    net = ns["load_network"]("merged", types.SimpleNamespace(filename=str(out)))
    theirs = {w.network_key.partition(".")[0]: sd_key for sd_key, w in net.modules.items()}
    module_keys = {k.partition(".")[0] for k in load_file(str(out))}
    assert len(module_keys) == len(keys) and set(theirs) == module_keys  # nothing dropped
    for key in module_keys:
        assert theirs[key] == resolve_network_key(key, mapping)[0], key  # type: ignore[index]
    # a q/k/v key keeps its suffix and reaches bigG's fused attention
    q = "lora_te2_text_model_encoder_layers_5_self_attn_q_proj"
    assert theirs[q] == "1_model_transformer_resblocks_5_attn_q_proj"
    assert net.modules[theirs[q]].sd_module is mapping["1_model_transformer_resblocks_5_attn"]


@pytest.fixture()
def standin_world(tmp_path: Path):
    from tests.standins.a1111 import build_world, installed
    from tests.test_host_a1111 import _te_keys
    from ziplora.formats.families import Family
    from ziplora.synthetic import attention_layers, write_random_lora
    from ziplora.toy.pipeline import untrained_toy

    folder = tmp_path / "Lora"
    folder.mkdir()
    keys = attention_layers(Family.TOYXL) + _te_keys("te1") + _te_keys("te2")
    write_random_lora(folder / "subject.safetensors", keys, Family.TOYXL, rank=4, seed=1, scale=0.3)
    world = build_world(untrained_toy(seed=0), folder)
    with installed(world):
        yield world


def test_module_names_and_weight_baking_match_the_real_functions(standin_world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """assign_network_names_to_compvis_modules, network_apply_weights and network_restore_weights_from_backup
    from networks.py, run on the stand-in's model through its patched forwards: the names the stand-in gives,
    the weights the stand-in bakes; the adapter's session, calling the real restore, gives the clean model for
    the job and the real baking comes back after it."""
    from tests.test_host_a1111 import _forward

    world = standin_world
    model, networks = world.sd_model, world.networks
    clean = state_hash(model)
    # the stand-in's own baking (a generation with <lora:subject:0.8>), then undone as after a model reload
    networks.load_networks(["subject"], [0.8], [0.8], None)
    _forward(world)
    standin_baked = state_hash(model)
    with torch.no_grad():  # as inside A1111's forwards (the UNet's weights require grad)
        for module in model.modules():
            networks.network_restore_weights_from_backup(module)
            networks.network_reset_cached_weight(module)
    assert state_hash(model) == clean != standin_baked

    ns = _networks_namespace({}, {})
    ns["shared"].sd_model = model
    _load(NETWORKS, ["assign_network_names_to_compvis_modules", "allowed_layer_without_weight", "store_weights_backup",
                     "restore_weights_backup", "network_restore_weights_from_backup", "network_apply_weights"], ns)  # fmt: skip
    standin_names = dict(model.network_layer_mapping)
    ns["assign_network_names_to_compvis_modules"](model)
    assert model.network_layer_mapping.keys() == standin_names.keys()
    assert all(model.network_layer_mapping[k] is v for k, v in standin_names.items())
    ns["loaded_networks"] = networks.loaded_networks
    monkeypatch.setattr(networks, "network_apply_weights", ns["network_apply_weights"])  # the real one behind the forwards
    _forward(world)
    assert ns["extra_network_lora"].errors == {}
    assert state_hash(model) == standin_baked
    # the adapter's session undoes the real baking with the real restore, and A1111 re-bakes it afterwards
    from tests.test_host_a1111 import ToyA1111Host
    from ziplora.hosts.base import SessionOptions
    from ziplora.progress import Progress

    monkeypatch.setattr(networks, "network_restore_weights_from_backup", ns["network_restore_weights_from_backup"])
    host = ToyA1111Host()
    with host.job(Progress()), host.session(SessionOptions(), Progress()):
        assert state_hash(model) == clean
    _forward(world)
    assert state_hash(model) == standin_baked and ns["extra_network_lora"].errors == {}
    src = _source(NETWORKS, "network_apply_weights")
    assert "module_q and module_k and module_v and module_out" in src and "network_current_names" in src
    top = _top(NETWORKS)
    for name in ("loaded_networks", "networks_in_memory", "available_networks", "list_available_networks", "load_networks"):
        assert name in top, name


def test_load_network_lookup_order_is_what_the_standin_mirrors() -> None:
    src = _source(NETWORKS, "load_network")
    for literal in ('.partition(".")', "re_x_proj.match(key)", 'replace("lora_unet", "diffusion_model")',
                    'replace("lora_te1_text_model", "0_transformer_text_model")', "keys_failed_to_match"):  # fmt: skip
        assert literal in src, literal
    assert src.index("re_x_proj.match(key)") < src.index('replace("lora_unet", "diffusion_model")')
    names = _source(NETWORKS, "assign_network_names_to_compvis_modules")
    assert "embedder.wrapped.named_modules()" in names and "shared.sd_model.model.named_modules()" in names


# ---------------------------------------------------------------------------------------------------------------
# the rest of the surface


def test_queue_lock_is_a_non_reentrant_fifo_lock() -> None:
    spec = importlib.util.spec_from_file_location("a1111_fifo_lock", Path(WEBUI) / "modules" / "fifo_lock.py")  # type: ignore[arg-type]
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    lock = module.FIFOLock()
    assert lock.acquire() is True
    assert lock.acquire(blocking=False) is False  # not reentrant: the adapter never nests queue-locked calls
    lock.release()
    with lock:
        pass
    assert "queue_lock = fifo_lock.FIFOLock()" in _text("modules/call_queue.py")
    wrap = _source("modules/call_queue.py", "wrap_gradio_call")
    for reset in ("shared.state.interrupted = False", "shared.state.skipped = False", "shared.state.stopping_generation = False"):
        assert reset in wrap


def test_sd_conditioning_and_options_as_the_adapter_calls_them() -> None:
    ns = _load("modules/prompt_parser.py", ["SdConditioning"], {})
    batch = ns["SdConditioning"](["", ""], is_negative_prompt=True, width=768, height=1024)
    assert list(batch) == ["", ""] and batch.is_negative_prompt and (batch.width, batch.height) == (768, 1024)
    ns = _load("modules/options.py", ["OptionInfo", "options_section"], {})
    section = ns["options_section"](("ziplora", "ZipLoRA"), {"ziplora_x": ns["OptionInfo"](1024, "label", None, {"minimum": 1})})
    assert section["ziplora_x"].section == ("ziplora", "ZipLoRA") and section["ziplora_x"].default == 1024
    assert "options_templates.update(shared.options_section(" in _text("extensions-builtin/Lora/scripts/lora_script.py")
    assert '"sd_lora"' in _text("extensions-builtin/Lora/scripts/lora_script.py")


def test_names_signatures_and_literals_the_adapter_uses() -> None:
    state = _top("modules/shared_state.py")["State"]
    assert isinstance(state, ast.ClassDef)
    methods = {n.name for n in state.body if isinstance(n, ast.FunctionDef)}
    fields = {t.id for n in state.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert {"begin", "end", "interrupt", "nextjob"} <= methods
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
    xl = _source("modules/sd_models_xl.py", "get_learned_conditioning")
    assert "force_zero_embeddings=['txt'] if force_zero_negative_prompt" in xl and "getattr(batch, 'width', 1024)" in xl
    assert "return self.model(x, t, cond)" in _source("modules/sd_models_xl.py", "apply_model")
    assert "cond[y] = cond[y].to(devices.dtype_unet)" in _source("modules/sd_hijack_unet.py", "apply_model")  # in place: pass a copy
    sdp = _top("modules/sd_hijack_optimizations.py")["SdOptimizationSdp"]
    attrs = {t.id: n.value.value for n in sdp.body if isinstance(n, ast.Assign) for t in n.targets  # type: ignore[attr-defined]
             if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}  # fmt: skip
    assert f"{attrs['name']} - {attrs['label']}" == "sdp - scaled dot product"
    assert _args("modules/sd_hijack.py", "apply_optimizations") == ["option"] and "current_optimizer" in _top("modules/sd_hijack.py")
    assert _args("modules/processing.py", "decode_latent_batch") == ["model", "batch", "target_device", "check_for_nans"]
    top = _top("modules/processing.py")
    assert ast.literal_eval(top["opt_C"].value) == 4 and ast.literal_eval(top["opt_f"].value) == 8  # type: ignore[attr-defined]
    assert "if isinstance(seed, list):" in _source("modules/processing.py", "process_images_inner")
    fields = _source("modules/processing.py", "StableDiffusionProcessing")
    for name in ("do_not_save_samples: bool", "do_not_save_grid: bool", "override_settings: dict", "scheduler: str", "seed: int"):
        assert name in fields, name
    assert _args("modules/sd_samplers_common.py", "images_tensor_to_samples") == ["image", "approximation", "model"]
    assert "current_unet" in _top("modules/sd_unet.py")
    devices = _top("modules/devices.py")
    for name in ("device", "cpu", "dtype", "dtype_unet", "fp8", "autocast", "torch_gc", "NansException"):
        assert name in devices, name
    callbacks = _top("modules/script_callbacks.py")
    assert {"on_ui_tabs", "on_app_started"} <= set(callbacks)
    assert _args("modules/script_callbacks.py", "app_started_callback") == ["demo", "app"]
    assert "basedir" in _top("modules/scripts.py")
    assert "api_only" in _text("webui.py") and "app_started_callback(None, app)" in _text("webui.py")
    assert 'shared.cmd_opts.api_auth.split(",")' in _text("modules/api/api.py")
    assert re.search(r're_extra_net = re\.compile\(r"<\(\\w\+\):\(\[\^>\]\+\)>"\)', _text("modules/extra_networks.py"))
    assert "shared.cmd_opts.lowvram" in _source("modules/lowvram.py", "is_needed")
    assert "alphas_cumprod_original" in _text("modules/sd_models.py")
    assert 'model.parameterization = "v" if' in _text("modules/sd_models_xl.py")


# ---------------------------------------------------------------------------------------------------------------
# bundled embeddings: networks.py's reading of bundle_emb, textual_inversion.py's database


def test_bundled_embeddings_are_read_and_registered_as_the_real_a1111_does(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """networks.py load_network's reading of ``bundle_emb`` keys and textual_inversion.py's own
    ``create_embedding_from_data`` / ``EmbeddingDatabase`` (stubs for devices, shared, hashes): the embedding the
    session builds equals the one A1111's Lora loader builds, the real database finds the trigger in a prompt
    while the session is open, and comes back exactly as it was."""
    import sys

    from safetensors.torch import load_file

    from tests.standins.textual_inversion import bundle_embedding, word_ids
    from tests.test_host_bundled_embeddings import snapshot
    from ziplora.formats.families import Family
    from ziplora.formats.lorafile import open_lora
    from ziplora.hosts.a1111.embeddings import bundled_embeddings_registered
    from ziplora.hosts.embeddings import bundled_embeddings
    from ziplora.synthetic import attention_layers, write_random_lora

    ti = _load("modules/textual_inversion/textual_inversion.py", ["Embedding", "EmbeddingDatabase", "create_embedding_from_data"],
               {"torch": torch, "os": os, "devices": types.SimpleNamespace(device=torch.device("cpu")),
                "hashes": types.SimpleNamespace(sha256=lambda *a, **k: None)})  # fmt: skip
    path = write_random_lora(tmp_path / "subject.safetensors", attention_layers(Family.TOYXL), Family.TOYXL, rank=2, seed=1)
    tensors = bundle_embedding(path, "sksdog", vectors=2, seed=3, widths=(768, 1280))  # SDXL's widths
    ns = _networks_namespace({}, {str(path): load_file(str(path))})
    ns["textual_inversion"] = types.SimpleNamespace(create_embedding_from_data=ti["create_embedding_from_data"])
    _load(NETWORKS, ["re_digits", "re_x_proj", "re_compiled", "suffix_conversion", "convert_diffusers_name_to_compvis",
                     "BundledTIHash", "load_network"], ns)  # fmt: skip
    theirs = ns["load_network"]("subject", types.SimpleNamespace(filename=str(path))).bundle_embeddings["sksdog"]
    found = bundled_embeddings(open_lora(path))
    ours = ti["create_embedding_from_data"](found[0].data, "sksdog", filename=f"{found[0].source}/sksdog")
    assert (ours.shape, ours.vectors, theirs.shape, theirs.vectors) == (2048, 2, 2048, 2)
    assert ours.vec.keys() == theirs.vec.keys() == {"clip_l", "clip_g"}
    assert all(torch.equal(ours.vec[k], theirs.vec[k]) and torch.equal(ours.vec[k], tensors[f"bundle_emb.sksdog.{k}"]) for k in ours.vec)

    db = ti["EmbeddingDatabase"]()
    db.expected_shape = 2048
    model = types.SimpleNamespace(cond_stage_model=types.SimpleNamespace(tokenize=word_ids))
    user = ti["create_embedding_from_data"]({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, "mystyle")
    db.register_embedding(user, model)
    before, _keep = snapshot(db)
    hijack = types.ModuleType("modules.sd_hijack")
    hijack.model_hijack = types.SimpleNamespace(embedding_db=db)  # type: ignore[attr-defined]
    real_ti = types.ModuleType("modules.textual_inversion.textual_inversion")
    real_ti.create_embedding_from_data = ti["create_embedding_from_data"]  # type: ignore[attr-defined]
    package = types.ModuleType("modules")
    package.__path__ = []  # type: ignore[attr-defined]
    package.sd_hijack = hijack  # type: ignore[attr-defined]
    ti_package = types.ModuleType("modules.textual_inversion")
    ti_package.__path__ = []  # type: ignore[attr-defined]
    ti_package.textual_inversion = real_ti  # type: ignore[attr-defined]
    for name, module in (("modules", package), ("modules.sd_hijack", hijack), ("modules.textual_inversion", ti_package),
                         ("modules.textual_inversion.textual_inversion", real_ti)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    with bundled_embeddings_registered(model, found) as names:
        assert names == ["sksdog"]
        tokens = word_ids(["a sksdog in mystyle"])[0]
        assert db.find_embedding_at_position(tokens, 1)[0].name == "sksdog"
        assert db.find_embedding_at_position(tokens, 3)[0] is user
    assert snapshot(db)[0] == before and db.find_embedding_at_position(tokens, 1) == (None, None)
    nets = _source(NETWORKS, "load_networks")
    assert "emb_db = sd_hijack.model_hijack.embedding_db" in nets and "emb_db.register_embedding(embedding, shared.sd_model)" in nets
    assert "if embedding.loaded is None and emb_name in emb_db.word_embeddings" in nets  # the folder's wins
