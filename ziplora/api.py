"""The HTTP API: start a merge, poll it, interrupt it, list the LoRAs it can take. WebUI-agnostic: the WebUI's
entry point passes the FastAPI app, the service and the ``--api-auth`` credentials (A1111 and Forge alike).

    POST /ziplora/v1/merge                  JSON MergeRequest fields -> {"job_id": ...}      (202); content and
                                            style are names from /loras (a stem, or sub/name where stems repeat)
    GET  /ziplora/v1/jobs/{job_id}          progress, losses, and when done the written file's summary
    POST /ziplora/v1/jobs/{job_id}/interrupt
    POST /ziplora/v1/reexport               {"name", "style_multiplier"}: rewrite a ZipLoRA output from its saved
                                            mergers with a new style strength (seconds; the tab's "Write again")
    GET  /ziplora/v1/loras                  every LoRA in the host's folder: the name that selects it (its stem,
                                            or its path below the folder where stems repeat), a summary or error

Routes an extension adds are outside the WebUI's ``--api-auth`` (A1111 modules/api/api.py applies it only to
its own routes), so these check the same credentials themselves: HTTP Basic, 401 with ``WWW-Authenticate``.
Errors are ``{"error": "<one line>"}``: 400 bad input, 401, 404 unknown LoRA or job, 409 busy, 500 the server's side
failed (disk full, read-only folder).
"""

import base64
import binascii
import json
import math
from collections.abc import Mapping
from hmac import compare_digest
from pathlib import Path
from typing import Any

from ziplora.errors import BusyError, InvalidRequestError, JobFailed, ZipLoraError
from ziplora.service import MergeService

__all__ = ["mount", "parse_credentials", "PREFIX", "start_merge", "job_status", "interrupt_job", "reexport_lora", "list_loras"]

PREFIX = "/ziplora/v1"


def parse_credentials(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"user:pass,user2:pass2"`` (the ``--api-auth`` format) -> {user: password}; empty means no auth.

    A password may contain ':' (split at the first one)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    out: dict[str, str] = {}
    for item in spec.split(","):
        user, sep, password = item.strip().partition(":")
        if sep and user:
            out[user] = password
    return out


def _jsonable(value: Any) -> Any:
    """Plain JSON (no NaN / inf, which strict encoders refuse): paths as text, tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _plain_name(value: Any, what: str, offered: Mapping[str, Path]) -> str:
    """A LoRA name as ``/loras`` offers it (``name`` or ``sub/name``): never a path out of the folder."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{what} must be the name of a LoRA in the WebUI's Lora folder")
    name = value.strip()
    if name in offered:
        return name
    if name.startswith(("/", "~")) or "\\" in name or ".." in name or ":" in name:
        raise InvalidRequestError(f"{what} {name!r} must be a LoRA name from /ziplora/v1/loras, not a path")
    return name


def _lora(host: Any, value: Any, what: str) -> Path:
    """The one file a LoRA name selects in the host's folder, or why not: 400 for a path-like or shared name,
    ``_NotFound`` (404) for a name that no file has."""
    from ziplora.lora_names import AmbiguousLoraName, lora_names, resolve_lora

    name = _plain_name(value, what, lora_names(host))
    try:
        return resolve_lora(host, value, paths=False)  # as given: the job resolves the same text again
    except AmbiguousLoraName:
        raise
    except InvalidRequestError as err:
        if "/" in name:  # no offered name: a path, as far as the API is concerned
            raise InvalidRequestError(f"{what} {name!r} must be a LoRA name from /ziplora/v1/loras, not a path") from None
        raise _NotFound(str(err)) from None


class _NotFound(ZipLoraError):
    """A well-formed name that no file has (404)."""


def _json_object(body: Any, fields: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed body (``json_body``'s result) as a JSON object holding ``required``, else the one-line error."""
    if isinstance(body, InvalidRequestError):
        raise body
    if not isinstance(body, dict) or any(key not in body for key in required):
        raise InvalidRequestError(f"the request must be a JSON object with {fields}")
    return body


Answer = tuple[int, dict[str, Any]]  # an HTTP status and its JSON body


def _failed(err: BaseException | str, status: int) -> Answer:
    return status, {"error": " ".join(str(err).split())}


def start_merge(service: MergeService, body: Any) -> Answer:
    """``POST /merge``: content and style are LoRA names from ``/loras``; the job runs in the background."""
    from ziplora.lora_names import lora_names
    from ziplora.request import MergeRequest

    try:
        body = _json_object(body, "content, style and output_name")
        offered = lora_names(service.host)
        for field in ("content", "style"):
            if field in body:
                _plain_name(body[field], field, offered)
        request = MergeRequest.from_dict(body)
        for field in ("content", "style"):
            _lora(service.host, body[field], field)
        job_id = service.submit_merge(request)
    except _NotFound as err:
        return _failed(err, 404)
    except BusyError as err:
        return _failed(err, 409)
    except ZipLoraError as err:
        return _failed(err, 400)
    return 202, {"job_id": job_id, "status": f"{PREFIX}/jobs/{job_id}"}


def job_status(service: MergeService, job_id: str) -> Answer:
    """``GET /jobs/{id}``: state, stage, step counts, losses; the written file's summary when done."""
    try:
        return 200, service.status(job_id).to_dict()
    except KeyError:
        return _failed(f"no job {job_id!r}", 404)


def interrupt_job(service: MergeService, job_id: str) -> Answer:
    """``POST /jobs/{id}/interrupt``: stop a running job at its next step; nothing is written."""
    try:
        status = service.status(job_id)
    except KeyError:
        return _failed(f"no job {job_id!r}", 404)
    if status.state == "running":
        service.interrupt(job_id)
    return 200, {"job_id": job_id, "state": status.state, "interrupt_requested": status.state == "running"}


def reexport_lora(service: MergeService, body: Any) -> Answer:
    """``POST /reexport``: write a merged LoRA again with a new style multiplier, from its saved mergers."""
    from ziplora.request import ReexportRequest

    try:
        body = _json_object(body, "name and style_multiplier", required=("name", "style_multiplier"))
        path = _lora(service.host, body["name"], "name")
        wanted = ReexportRequest.from_dict(body)
        done = service.reexport(path, wanted.style_multiplier)
    except _NotFound as err:
        return _failed(err, 404)
    except BusyError as err:
        return _failed(err, 409)
    except JobFailed as err:  # the server's side failed (disk full, read-only folder): not a bad request
        return _failed(err, 500)
    except ZipLoraError as err:
        return _failed(err, 400)
    return 200, {"name": wanted.name, **done}


def list_loras(service: MergeService) -> Answer:
    """``GET /loras``: every LoRA in the host's folder under the name that selects it, with a one-line summary
    or why it cannot be read."""
    from ziplora.formats.lorafile import open_lora
    from ziplora.lora_names import lora_names

    items = []
    for name, path in lora_names(service.host).items():
        item: dict[str, Any] = {"name": name, "file": path.name}
        try:
            lora = open_lora(path)
            summary = lora.summary()
            item.update(summary=summary.one_line(), family=summary.family, mergeable=lora.family in service.host.families,
                        trigger_words=summary.trigger_words)  # fmt: skip
        except ZipLoraError as err:
            item.update(error=str(err), mergeable=False)
        except OSError as err:
            item.update(error=f"cannot read the file: {err.strerror or err}", mergeable=False)
        items.append(item)
    return 200, {"lora_dir": str(service.host.lora_dir()), "loras": items}


def _allowed(users: Mapping[str, str], authorization: str) -> bool:
    """HTTP Basic credentials against the ``--api-auth`` users (everyone when there are none)."""
    if not users:
        return True
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = users.get(user)
    return expected is not None and compare_digest(password.encode(), expected.encode())


def mount(app: Any, service: MergeService, credentials: str | Mapping[str, str] | None = None) -> None:
    """Add the routes to ``app`` (a FastAPI instance). ``credentials``: the ``--api-auth`` value, or None."""
    # no ``from __future__ import annotations`` in this module: FastAPI reads these annotations at runtime
    from fastapi import Depends, Request
    from fastapi.responses import JSONResponse

    users = parse_credentials(credentials)

    def answer(request: Request, work: Any, *args: Any) -> JSONResponse:
        """401 without the right credentials; else ``work(service, *args)`` as JSON."""
        if not _allowed(users, request.headers.get("authorization", "")):
            status, data = _failed("incorrect or missing username and password (this WebUI was started with --api-auth)", 401)
            return JSONResponse(data, status_code=status, headers={"WWW-Authenticate": "Basic"})
        status, data = work(service, *args)
        return JSONResponse(_jsonable(data), status_code=status)

    async def json_body(request: Request) -> Any:
        """The body as JSON, or an InvalidRequestError to report (read here: sync routes cannot await)."""
        raw = await request.body()
        try:
            return json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as err:
            return InvalidRequestError(f"the request body is not valid JSON ({err})")
        except RecursionError:  # json's decoder recurses once per nesting level: thousands of "[" end here
            return InvalidRequestError("the request body is not valid JSON (nested too deeply)")

    def merge(request: Request, body: Any = Depends(json_body)) -> JSONResponse:
        return answer(request, start_merge, body)

    def status(job_id: str, request: Request) -> JSONResponse:
        return answer(request, job_status, job_id)

    def interrupt(job_id: str, request: Request) -> JSONResponse:
        return answer(request, interrupt_job, job_id)

    def reexport(request: Request, body: Any = Depends(json_body)) -> JSONResponse:
        return answer(request, reexport_lora, body)

    def loras(request: Request) -> JSONResponse:
        return answer(request, list_loras)

    app.add_api_route(f"{PREFIX}/merge", merge, methods=["POST"], status_code=202)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}", status, methods=["GET"])
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}/interrupt", interrupt, methods=["POST"])
    app.add_api_route(f"{PREFIX}/reexport", reexport, methods=["POST"])
    app.add_api_route(f"{PREFIX}/loras", loras, methods=["GET"])
