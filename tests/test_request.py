"""One declaration per request field: every face offers what is declared for it, with the same name and default,
and a bad value gets the same one-line message on the command line, from the API and in the tab."""

from __future__ import annotations

import argparse
import dataclasses
import html
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ziplora import cli
from ziplora.api import mount
from ziplora.errors import InvalidRequestError
from ziplora.request import FACES, MergeRequest, ReexportRequest, options
from ziplora.request.flags import add_flags, flag_values
from ziplora.request.options import from_json, option
from ziplora.service import MergeService

BODY = {"content": "subject", "style": "style", "output_name": "o"}
# fields a face does not show, and why: the CLI's --out is the output's path; the tab always zips (for now)
NOT_ON = {"cli": {"output_name"}, "api": set(), "tab": {"method"}}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_field_is_declared_with_a_label_a_one_line_help_and_a_valid_default() -> None:
    for request in (MergeRequest, ReexportRequest):
        for spec in options(request):
            assert spec.label and spec.help and "\n" not in spec.help, spec.name
            assert set(spec.faces) <= set(FACES) and spec.kind in ("text", "int", "number", "bool", "paths"), spec.name
            if spec.choices:
                assert spec.default in spec.choices, spec.name
            if not spec.required and spec.default is not None and spec.kind in ("int", "number"):
                assert spec.lo <= spec.default <= spec.hi, spec.name  # type: ignore[operator]
    assert MergeRequest("a", "b", "c").validated() == MergeRequest("a", "b", "c")  # the defaults pass their own checks
    assert {f: {o.name for o in options(MergeRequest) if f not in o.faces} for f in FACES} == NOT_ON


def test_every_cli_field_is_a_flag_with_the_declared_default() -> None:
    parsers = _subparsers()
    for command, request in (("merge", MergeRequest), ("reexport", ReexportRequest)):
        actions = {a.dest: a for a in parsers[command]._actions}
        for spec in options(request):
            if "cli" not in spec.faces:
                assert spec.name not in actions, spec.name
                continue
            action = actions[spec.name]
            assert spec.cli_flag in action.option_strings or action.dest == spec.name and not action.option_strings, spec.name
            assert action.required is spec.required or not action.option_strings, spec.name
            if not spec.required:
                assert action.default == spec.default, spec.name
    args = parsers["merge"].parse_args(
        ["--content", "a", "--style", "b", "--out", "c.safetensors", "--rank", "8", "--no-merge-text-encoders"]
    )
    assert args.target_rank == 8 and args.merge_text_encoders is False  # an alias kept from older command lines


def test_every_api_field_is_a_key_and_nothing_else_is() -> None:
    for spec in options(MergeRequest, "api"):
        value = BODY.get(spec.name, spec.default)
        assert getattr(MergeRequest.from_dict({**BODY, spec.name: value}), spec.name) == (tuple(value) if spec.kind == "paths" else value)
    with pytest.raises(InvalidRequestError) as caught:
        MergeRequest.from_dict({**BODY, "colour": "red"})
    assert str(caught.value) == f"unknown option 'colour'; known: {', '.join(sorted(o.name for o in options(MergeRequest, 'api')))}"
    with pytest.raises(InvalidRequestError, match="unknown option 'colour'; known: name, style_multiplier"):
        ReexportRequest.from_dict({"name": "x", "style_multiplier": 0.5, "colour": "red"})


def _other_value(spec: Any) -> Any:
    """A valid value that is not the default, as the tab's control would hold it."""
    from ziplora.ui.controls import choice_labels

    if spec.kind == "bool":
        return not spec.default
    if spec.choices:
        return next(label for label, value in choice_labels(spec).items() if value != spec.default)
    if spec.kind == "int":
        return (spec.default + 1) if spec.default is not None else int(spec.lo) + 8 - int(spec.lo) % 8
    if spec.kind == "number":
        return spec.default / 2 if spec.default else spec.lo + 1.5
    return "a changed value"


@pytest.mark.gradio
def test_every_tab_field_is_a_control_and_reaches_the_request(toy_host, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("gradio")
    from ziplora import ui
    from ziplora.ui.controls import choice_labels, elem_id, form_defaults, tab_name

    service = MergeService(toy_host)
    wiring = ui.build_tab(service).ziplora_wiring
    zip_inputs = next(e[3] for e in wiring.events if e[0] == "zip")
    values = {**form_defaults(), "subject": "subject", "style": "style"}
    for spec in options(MergeRequest, "tab"):
        name = tab_name(spec)
        assert name in zip_inputs and wiring.components[name].elem_id == elem_id(spec), spec.name
        if spec.kind != "paths" and spec.name not in ("content", "style", "inputs"):  # pickers, uploads: their own tests
            values[name] = _other_value(spec)
    sent: list[MergeRequest] = []
    monkeypatch.setattr(service, "submit_merge", lambda request: sent.append(request) or "job")
    monkeypatch.setattr(service, "status", lambda job: (_ for _ in ()).throw(KeyError(job)))  # stop after the submit
    list(wiring.handlers.zip(*[values[n] for n in zip_inputs]))
    assert len(sent) == 1
    for spec in options(MergeRequest, "tab"):
        raw = values[tab_name(spec)]
        if spec.kind != "paths" and spec.name not in ("content", "style", "inputs", "output_name"):
            assert getattr(sent[0], spec.name) == choice_labels(spec).get(raw, raw), spec.name


BAD = [
    ("steps", 0), ("steps", "many"), ("style_multiplier", 1.7), ("content_weight", 3.0), ("lam", -1.0), ("lr", 2.0),
    ("target_rank", 5000), ("resolution", 30), ("samples", 65), ("guidance", 31.0), ("seed", -1), ("similarity", "l2"),
    ("reduction", "max"), ("precision", "fp8"), ("form", "wide"), ("inputs", "photos"), ("content_prompt", "x" * 1001),
]  # fmt: skip


@pytest.mark.gradio
@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={str(v)[:8]}" for f, v in BAD])
def test_a_bad_value_gets_the_same_message_on_every_face(toy_host, lora_dir: Path, capsys, field: str, value: Any) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("gradio")
    from ziplora.ui import TabHandlers
    from ziplora.ui.controls import form_defaults, tab_name, zip_fields

    with pytest.raises(InvalidRequestError) as caught:
        MergeRequest(**{**BODY, field: value}).validated()
    expected = str(caught.value)
    # the command line
    flag = "--" + field.replace("_", "-")
    argv = ["merge", "--content", str(lora_dir / "subject.safetensors"), "--style", str(lora_dir / "style.safetensors"),
            "--out", str(lora_dir / "o.safetensors"), flag, str(value)]  # fmt: skip
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    # the API
    service = MergeService(toy_host)
    app = FastAPI()
    mount(app, service)
    r = TestClient(app).post("/ziplora/v1/merge", json={**BODY, field: value})
    assert (r.status_code, r.json()) == (400, {"error": expected})
    # the tab (the Zip button's values, as gradio hands them over)
    spec = next(o for o in options(MergeRequest) if o.name == field)
    values = {**form_defaults(), "subject": "subject", "style": "style", "output_name": "o", tab_name(spec): value}
    items = list(TabHandlers(service).zip(*[values[n] for n in zip_fields()]))
    assert len(items) == 1 and "ziplora-msg-error" in items[0][0]
    assert html.unescape(re.sub(r"<[^>]+>", "", items[0][0])) == expected
    assert not (lora_dir / "o.safetensors").exists()


@pytest.mark.gradio
def test_reexport_checks_its_request_the_same_on_every_face(toy_host, lora_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("gradio")
    from ziplora.ui import TabHandlers

    expected = "style multiplier must be between 0 and 1.5, got 9"
    assert cli.main(["reexport", str(lora_dir / "subject.safetensors"), "--style-multiplier", "9"]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    service = MergeService(toy_host)
    app = FastAPI()
    mount(app, service)
    r = TestClient(app).post("/ziplora/v1/reexport", json={"name": "subject", "style_multiplier": 9})
    assert (r.status_code, r.json()) == (400, {"error": expected})
    text = TabHandlers(service).reexport({"file": str(lora_dir / "subject.safetensors")}, 9)
    assert html.unescape(re.sub(r"<[^>]+>", "", text)) == expected


@pytest.mark.gradio
def test_a_new_field_is_one_declaration(toy_host, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A request with one field more: the CLI flag, the API key, the tab's control and the check all follow."""
    pytest.importorskip("gradio")
    from ziplora import ui
    from ziplora.ui import controls

    field = ("blend", float, option(0.5, "blend", "how much of each to blend", lo=0.0, hi=1.0))
    extended = dataclasses.make_dataclass("Extended", [field], bases=(MergeRequest,), frozen=True)
    parser = argparse.ArgumentParser()
    add_flags(parser, extended)
    args = parser.parse_args(["--content", "a", "--style", "b", "--blend", "0.25"])
    assert flag_values(args, extended)["blend"] == 0.25
    with pytest.raises(InvalidRequestError, match=r"^blend must be between 0 and 1, got 2$"):
        from_json(extended, {**BODY, "blend": 2})
    assert from_json(extended, BODY).blend == 0.5  # type: ignore[attr-defined]

    monkeypatch.setattr(controls, "REQUEST", extended)
    service = MergeService(toy_host)
    wiring = ui.build_tab(service).ziplora_wiring
    blend = wiring.components["blend"]
    assert (blend.label, blend.value, blend.elem_id) == ("Blend", 0.5, "ziplora-blend")
    sent: list[Any] = []
    monkeypatch.setattr(service, "submit_merge", lambda request: sent.append(request) or "job")
    monkeypatch.setattr(service, "status", lambda job: (_ for _ in ()).throw(KeyError(job)))
    zip_inputs = next(e[3] for e in wiring.events if e[0] == "zip")
    values = {**controls.form_defaults(), "subject": "subject", "style": "style", "output_name": "o", "blend": 0.75}
    list(wiring.handlers.zip(*[values[n] for n in zip_inputs]))
    assert sent[0].blend == 0.75
