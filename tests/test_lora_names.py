"""LoRA names: a stem that files in several folders share selects none of them, and a folder-qualified name
(``sub/name``, ``./name`` for the top folder) selects exactly one, in the core, the API and the tab's pickers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ziplora.api import mount
from ziplora.errors import InvalidRequestError
from ziplora.export import load_mergers
from ziplora.formats import Family
from ziplora.hosts.base import FilesHost
from ziplora.lora_names import AmbiguousLoraName, lora_names, resolve_lora
from ziplora.service import MergeService
from ziplora.synthetic import attention_layers, write_random_lora

FAST = {"steps": 2, "sampling_steps": 2, "samples": 1}


def _lora(path: Path, seed: int, words: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"modelspec.trigger_phrase": words} if words else None
    return write_random_lora(path, attention_layers(Family.TOYXL), Family.TOYXL, rank=4, seed=seed, scale=0.3, metadata=meta)


@pytest.fixture()
def twins(lora_dir: Path) -> dict[str, Path]:
    """Two files named ``twin`` in two subfolders, beside the conftest's ``subject`` and ``style``."""
    return {"one/twin": _lora(lora_dir / "one" / "twin.safetensors", 11, "sks shape"),
            "two/twin": _lora(lora_dir / "two" / "twin.safetensors", 12, "zwx style")}  # fmt: skip


def test_a_stem_two_subfolders_share_is_an_error_naming_both(twins: dict[str, Path], lora_dir: Path) -> None:
    host = FilesHost(lora_dir)
    for name in ("twin", "twin.safetensors"):
        with pytest.raises(AmbiguousLoraName) as caught:
            resolve_lora(host, name)
        message = str(caught.value)
        assert "one/twin" in message and "two/twin" in message and "\n" not in message, message
    for name, path in twins.items():
        assert resolve_lora(host, name) == path
        assert resolve_lora(host, f"{name}.safetensors") == path
        assert resolve_lora(host, name, paths=False) == path
    assert resolve_lora(host, "subject") == lora_dir / "subject.safetensors"  # a stem one file has still selects it
    assert lora_names(host) == {"style": lora_dir / "style.safetensors", "subject": lora_dir / "subject.safetensors", **twins}


def test_a_top_folder_file_and_a_subfolder_file_with_one_stem(lora_dir: Path) -> None:
    top = _lora(lora_dir / "same.safetensors", 21)
    sub = _lora(lora_dir / "styles" / "same.safetensors", 22)
    host = FilesHost(lora_dir)
    names = lora_names(host)
    assert names["./same"] == top and names["styles/same"] == sub and "same" not in names
    with pytest.raises(AmbiguousLoraName, match=r"\./same, styles/same"):
        resolve_lora(host, "same")
    assert resolve_lora(host, "./same") == top and resolve_lora(host, "styles/same") == sub
    for name, path in names.items():  # every offered name selects its own file
        assert resolve_lora(host, name, paths=False) == path


def test_names_that_select_nothing(lora_dir: Path) -> None:
    host = FilesHost(lora_dir)
    with pytest.raises(InvalidRequestError, match="no LoRA named 'nobody'"):
        resolve_lora(host, "nobody")
    with pytest.raises(InvalidRequestError, match="no LoRA named 'sub/subject'"):
        resolve_lora(host, "sub/subject", paths=False)  # the API never falls back to a path
    assert resolve_lora(host, str(lora_dir / "subject.safetensors")) == lora_dir / "subject.safetensors"  # the CLI's files


def _poll(client: TestClient, job_id: str) -> dict:
    deadline = time.monotonic() + 300
    while True:
        data = client.get(f"/ziplora/v1/jobs/{job_id}").json()
        if data["state"] != "running" or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def test_the_api_offers_and_takes_names_that_select_one_file(toy_host, lora_dir: Path, twins: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    app = FastAPI()
    mount(app, MergeService(toy_host))
    client = TestClient(app)
    listed = {item["name"]: item["file"] for item in client.get("/ziplora/v1/loras").json()["loras"]}
    assert listed == {"one/twin": "twin.safetensors", "two/twin": "twin.safetensors", "style": "style.safetensors",
                      "subject": "subject.safetensors"}  # fmt: skip
    r = client.post("/ziplora/v1/merge", json={"content": "twin", "style": "style", "output_name": "o", **FAST})
    assert r.status_code == 400 and "one/twin" in r.json()["error"] and "two/twin" in r.json()["error"], r.text
    r = client.post("/ziplora/v1/merge", json={"content": "two/twin", "style": "one/twin", "output_name": "pair", **FAST})
    assert r.status_code == 202, r.text
    assert _poll(client, r.json()["job_id"])["state"] == "done"
    saved = load_mergers(lora_dir / "pair.ziplora")
    assert saved.content_path == twins["two/twin"] and saved.style_path == twins["one/twin"]
    r = client.post("/ziplora/v1/reexport", json={"name": "two/twin", "style_multiplier": 0.5})
    assert r.status_code == 400 and "has no saved mergers" in r.json()["error"]  # found by its qualified name
    r = client.post("/ziplora/v1/reexport", json={"name": "twin", "style_multiplier": 0.5})
    assert r.status_code == 400 and "one/twin" in r.json()["error"]
    r = client.post("/ziplora/v1/merge", json={"content": "three/twin", "style": "style", "output_name": "o", **FAST})
    assert r.status_code == 400 and "not a path" in r.json()["error"]


@pytest.mark.gradio
def test_the_pickers_offer_names_that_select_one_file(toy_host, twins: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("gradio")
    from ziplora.ui import TabHandlers
    from ziplora.ui.controls import form_defaults

    handlers = TabHandlers(MergeService(toy_host))
    assert handlers.choices() == ["style", "subject", "one/twin", "two/twin"]
    for name, path in twins.items():
        assert handlers.resolve(name, "subject") == path
    values = {**form_defaults(), "subject": "two/twin", "style": "one/twin", "output_name": "o"}
    request, subject, style = handlers.build_request(values)
    assert (subject, style) == (twins["two/twin"], twins["one/twin"]) and request.content == str(twins["two/twin"])
