"""The /ziplora/v1 routes on a FastAPI TestClient over a toy-host MergeService."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ziplora.api import mount, parse_credentials
from ziplora.service import MergeService

BODY = {"content": "subject", "style": "style", "output_name": "zipped", "steps": 3, "sampling_steps": 2, "samples": 1}


def _client(service: MergeService, credentials: str | None = None) -> TestClient:
    app = FastAPI()
    mount(app, service, credentials)
    return TestClient(app)


def _poll(client: TestClient, job_id: str, auth: tuple[str, str] | None = None, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        data = client.get(f"/ziplora/v1/jobs/{job_id}", auth=auth).json()
        if data["state"] != "running" or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def test_merge_and_poll_to_done(toy_host, lora_dir: Path) -> None:
    client = _client(MergeService(toy_host))
    r = client.post("/ziplora/v1/merge", json=BODY)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    data = _poll(client, job_id)
    assert data["state"] == "done", data["error"]
    assert len(data["losses"]) == 3 and data["stage"] == "Writing the merged LoRA" and data["step"] == data["steps"]
    result = data["result"]
    assert Path(result["file"]) == lora_dir / "zipped.safetensors" and (lora_dir / "zipped.safetensors").is_file()
    assert result["tag"].startswith("<lora:zipped:1>") and result["steps"] == 3
    assert client.get("/ziplora/v1/jobs/nope").status_code == 404
    r = client.post(f"/ziplora/v1/jobs/{job_id}/interrupt")
    assert r.status_code == 200 and r.json() == {"job_id": job_id, "state": "done", "interrupt_requested": False}


def test_loras_lists_names_with_summaries_or_the_error(toy_host, lora_dir: Path) -> None:
    (lora_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    data = _client(MergeService(toy_host)).get("/ziplora/v1/loras").json()
    assert data["lora_dir"] == str(lora_dir)
    items = {item["name"]: item for item in data["loras"]}
    assert set(items) == {"broken", "style", "subject"}
    assert items["subject"]["mergeable"] and "trigger words: sks shape" in items["subject"]["summary"]
    assert items["subject"]["family"] == "ToyXL"
    assert not items["broken"]["mergeable"] and items["broken"]["error"] and "\n" not in items["broken"]["error"]


def test_credentials_are_checked_when_set(toy_host) -> None:
    client = _client(MergeService(toy_host), "alice:se:cret,bob:pw")
    for method, path in (("get", "/ziplora/v1/loras"), ("post", "/ziplora/v1/merge"), ("get", "/ziplora/v1/jobs/x"),
                         ("post", "/ziplora/v1/jobs/x/interrupt")):  # fmt: skip
        r = getattr(client, method)(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic" and "error" in r.json()
    assert client.get("/ziplora/v1/loras", auth=("alice", "wrong")).status_code == 401
    assert client.get("/ziplora/v1/loras", headers={"Authorization": "Basic %%%"}).status_code == 401
    assert client.get("/ziplora/v1/loras", auth=("alice", "se:cret")).status_code == 200
    assert client.get("/ziplora/v1/loras", auth=("bob", "pw")).status_code == 200
    assert client.get("/ziplora/v1/jobs/x", auth=("bob", "pw")).status_code == 404
    assert parse_credentials(None) == {} and parse_credentials("u:p, v:q:r") == {"u": "p", "v": "q:r"}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b"", 400, "must be a JSON object"),
        ({**BODY, "steps": "many"}, 400, "steps must be a whole number"),
        ({**BODY, "colour": "red"}, 400, "unknown option 'colour'"),
        ({**BODY, "output_name": "../evil"}, 400, "plain file name"),
        ({**BODY, "content": "../subject"}, 400, "not a path"),
        ({**BODY, "style": "/etc/passwd"}, 400, "not a path"),
        ({**BODY, "content": "C:\\loras\\x"}, 400, "not a path"),
        ({**BODY, "style": "missing"}, 404, "no LoRA named 'missing'"),
    ],
    ids=[
        "malformed",
        "array",
        "empty",
        "bad-number",
        "unknown-option",
        "output-path",
        "content-path",
        "style-abs",
        "windows-path",
        "unknown-lora",
    ],
)
def test_bad_input_is_a_one_line_error(toy_host, lora_dir: Path, body, status: int, words: str) -> None:  # type: ignore[no-untyped-def]
    client = _client(MergeService(toy_host))
    if isinstance(body, bytes):
        r = client.post("/ziplora/v1/merge", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/ziplora/v1/merge", json=body)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert words in message and "\n" not in message
    assert not (lora_dir / "zipped.safetensors").exists()


def test_a_second_merge_while_one_runs_is_409_and_interrupt_stops_the_first(toy_host, lora_dir: Path) -> None:
    gate = threading.Event()
    job = toy_host.job

    @contextmanager
    def held(progress):  # type: ignore[no-untyped-def]
        gate.wait(30)  # the WebUI's queue is busy: the first job stays running
        with job(progress):
            yield

    toy_host.job = held
    client = _client(MergeService(toy_host))
    first = client.post("/ziplora/v1/merge", json={**BODY, "steps": 200}).json()["job_id"]
    r = client.post("/ziplora/v1/merge", json={**BODY, "output_name": "second"})
    assert r.status_code == 409 and "is running" in r.json()["error"]
    r = client.post(f"/ziplora/v1/jobs/{first}/interrupt")
    assert r.status_code == 200 and r.json()["interrupt_requested"] is True
    gate.set()
    data = _poll(client, first)
    assert data["state"] == "interrupted" and "nothing was written" in data["error"]
    assert not (lora_dir / "zipped.safetensors").exists() and not (lora_dir / "second.safetensors").exists()
    assert client.post("/ziplora/v1/jobs/missing/interrupt").status_code == 404


def test_reexport_rewrites_the_file_with_a_new_style_multiplier(toy_host, lora_dir: Path) -> None:
    """The tab's "Write again with this style multiplier", over HTTP (tests/e2e use it against real WebUIs)."""
    from ziplora.formats import open_lora

    client = _client(MergeService(toy_host))
    job_id = client.post("/ziplora/v1/merge", json=BODY).json()["job_id"]
    assert _poll(client, job_id)["state"] == "done"
    before = open_lora(lora_dir / "zipped.safetensors").data_hash
    r = client.post("/ziplora/v1/reexport", json={"name": "zipped", "style_multiplier": 0.5})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "zipped" and Path(r.json()["file"]) == lora_dir / "zipped.safetensors"
    assert open_lora(lora_dir / "zipped.safetensors").data_hash != before
    assert client.post("/ziplora/v1/reexport", json={"name": "nope", "style_multiplier": 0.5}).status_code == 404
    assert client.post("/ziplora/v1/reexport", json={"name": "subject", "style_multiplier": 0.5}).status_code == 400  # not a merge
    assert client.post("/ziplora/v1/reexport", json={"name": "zipped", "style_multiplier": 9}).status_code == 400
    assert client.post("/ziplora/v1/reexport", json={"name": "../zipped", "style_multiplier": 0.5}).status_code == 400
    assert client.post("/ziplora/v1/reexport", json={"name": "zipped"}).status_code == 400
