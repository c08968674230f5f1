"""A test-only WebUI extension for tests/e2e: read-only looks inside the running WebUI (AUTOMATIC1111 or Forge).

tests/e2e links this folder into the WebUI's ``extensions/`` next to sd-webui-ziplora for the duration of the
run and removes the link afterwards; it is never installed for users. Its routes answer what the HTTP API
cannot show:

    GET /ziplora-e2e/v1/params-hash        a digest of the UNet's and the text encoders' parameters (values,
                                           dtypes, shapes, requires_grad), taken under the WebUI's queue lock
    GET /ziplora-e2e/v1/lora-keys?name=N   LoRA N loaded by the WebUI's own Lora code: matched and unmatched keys
    GET /ziplora-e2e/v1/comments           the processing comments (e.g. "Networks with errors: ...") recorded
                                           since the last call: A1111's API response does not include them
"""

# no ``from __future__ import annotations``: FastAPI reads the route annotations at runtime
import hashlib
import logging
import threading
import time
from typing import Any

_comments: list[str] = []
_comments_lock = threading.Lock()


def _is_forge() -> bool:
    import importlib.util

    return importlib.util.find_spec("modules_forge") is not None


def _record_comments() -> None:
    """Wrap ``StableDiffusionProcessing.comment`` (both WebUIs): every comment a generation adds is kept here."""
    from modules import processing

    cls = processing.StableDiffusionProcessing
    original = cls.comment
    if getattr(original, "_ziplora_e2e", False):
        return

    def comment(self: Any, text: str) -> None:
        with _comments_lock:
            _comments.append(str(text))
        return original(self, text)

    comment._ziplora_e2e = True  # type: ignore[attr-defined]
    cls.comment = comment


def _digest(modules: dict[str, Any]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for label, module in modules.items():
        h = hashlib.blake2b(digest_size=16)
        count = trainable = 0
        with torch.inference_mode(False), torch.no_grad():
            for name, p in sorted(module.named_parameters(), key=lambda item: item[0]):
                t = p.detach()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{p.requires_grad}".encode())
                if t.device.type != "cpu":
                    t = t.cpu()
                flat = t.contiguous().reshape(-1)
                h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
                count += t.numel()
                trainable += int(p.requires_grad)
        out[label] = {"digest": h.hexdigest(), "elements": count, "requires_grad": trainable}
    return out


def _model_parts() -> dict[str, Any]:
    from modules import shared

    model = shared.sd_model
    if _is_forge():
        objects = model.forge_objects
        return {"unet": objects.unet.model.diffusion_model, "text_encoders": objects.clip.cond_stage_model}
    return {"unet": model.model.diffusion_model, "text_encoders": model.conditioner}


def _lora_keys(name: str) -> dict[str, Any]:
    from safetensors import safe_open

    if _is_forge():
        return _lora_keys_forge(name)
    import networks  # the built-in Lora extension

    networks.list_available_networks()
    on_disk = networks.available_networks.get(name)
    if on_disk is None:
        return {"error": f"the Lora extension does not list {name!r}"}
    with safe_open(on_disk.filename, "pt") as f:
        file_modules = sorted({k.split(".", 1)[0] for k in f.keys() if not k.startswith("bundle_emb.")})
    messages: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    root = logging.getLogger()
    handler, level = Capture(level=logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        net = networks.load_network(name, on_disk)  # networks.py logs unmatched keys at debug level only
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    matched = sorted({m.network_key.split(".", 1)[0] for m in net.modules.values()})  # network_key: a full file key
    mapping = getattr(__import__("modules.shared", fromlist=["sd_model"]).sd_model, "network_layer_mapping", {})
    return {
        "webui": "a1111",
        "file": on_disk.filename,
        "file_modules": len(file_modules),
        "matched": len(matched),
        "unmatched": sorted(set(file_modules) - set(matched)),
        "debug_unmatched_messages": [m for m in messages if "didn't match keys" in m],
        "layer_mapping_size": len(mapping),
        "hash": getattr(on_disk, "shorthash", None),
    }


def _lora_keys_forge(name: str) -> dict[str, Any]:
    import networks  # sd_forge_lora
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
    from modules import shared

    networks.list_available_networks()
    on_disk = networks.available_networks.get(name)
    if on_disk is None:
        return {"error": f"Forge's LoRA list has no {name!r}"}
    model = shared.sd_model
    original = model.forge_objects_original
    lora = networks.load_lora_state_dict(on_disk.filename)
    unet_keys = model_lora_keys_unet(original.unet.model)
    clip_keys = model_lora_keys_clip(original.clip.cond_stage_model)
    lora_unet, rest = load_lora(lora, unet_keys)
    lora_clip, rest = load_lora(rest, clip_keys)
    # as extensions-builtin/sd_forge_lora/networks.py load_lora_for_models does, on throwaway clones
    unet_loaded = original.unet.clone().add_patches(filename=on_disk.filename, patches=lora_unet, strength_patch=1.0)
    clip_loaded = original.clip.clone().add_patches(filename=on_disk.filename, patches=lora_clip, strength_patch=1.0)
    file_modules = sorted({k.split(".", 1)[0] for k in lora if not k.startswith("bundle_emb.")})
    return {
        "webui": "forge",
        "file": on_disk.filename,
        "file_modules": len(file_modules),
        "matched": len(unet_loaded) + len(clip_loaded),
        "unet_patches": len(lora_unet),
        "clip_patches": len(clip_loaded),
        "unmatched": sorted(rest.keys()),
        "skipped": sorted(str(k) for k in list(lora_unet) + list(lora_clip) if k not in set(unet_loaded) | set(clip_loaded)),
        "hash": getattr(on_disk, "shorthash", None),
    }


def _mount(app: Any) -> None:
    from fastapi.responses import JSONResponse
    from modules import call_queue

    def params_hash() -> JSONResponse:
        start = time.perf_counter()
        with call_queue.queue_lock:
            parts = _digest(_model_parts())
        return JSONResponse({"parts": parts, "seconds": time.perf_counter() - start})

    def lora_keys(name: str) -> JSONResponse:
        with call_queue.queue_lock:
            try:
                return JSONResponse(_lora_keys(name))
            except Exception as err:  # noqa: BLE001 - reported to the test
                return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=500)

    def comments() -> JSONResponse:
        with _comments_lock:
            out = list(_comments)
            _comments.clear()
        return JSONResponse({"comments": out})

    app.add_api_route("/ziplora-e2e/v1/params-hash", params_hash, methods=["GET"])
    app.add_api_route("/ziplora-e2e/v1/lora-keys", lora_keys, methods=["GET"])
    app.add_api_route("/ziplora-e2e/v1/comments", comments, methods=["GET"])


def _setup() -> None:
    from modules import script_callbacks

    _record_comments()
    script_callbacks.on_app_started(lambda _demo, app: _mount(app))


_setup()
