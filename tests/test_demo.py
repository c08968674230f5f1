"""The README's first command, ``python -m ziplora demo``, on the bundled assets (a short run: few steps)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from ziplora.cli import main
from ziplora.formats import Family, open_lora
from ziplora.toy.catalog import by_name
from ziplora.toy.demo import COLUMNS, ROWS, SEEDS


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_demo_writes_both_merges_the_grid_and_a_scored_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out), "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "ZipLoRA demo" in printed and "<lora:zipped:1>" in printed

    report = json.loads((out / "report.json").read_text())
    subject, style = by_name(report["subject_lora"]), by_name(report["style_lora"])
    zipped = open_lora(out / "zipped.safetensors", expect=Family.TOYXL)
    direct = open_lora(out / "direct.safetensors", expect=Family.TOYXL)
    for merged in (zipped, direct):
        assert merged.trigger_words == [subject.trigger, style.trigger]
    assert zipped.metadata["ziplora_method"] == "ziplora" and direct.metadata["ziplora_method"] == "direct"

    # 4 rows x 3 columns of 2x2 tiles of 32 px images upscaled 3x, padded
    tile = 2 * 96 + 3 * 1
    assert _png_size(out / "grid.png") == (3 * tile + 4 * 8, 4 * tile + 5 * 8)

    assert report["rows"] == list(ROWS) and report["columns"] == list(COLUMNS) and report["seeds"] == SEEDS
    assert report["ziplora"]["steps"] == 4
    for row in ROWS:
        for col in COLUMNS:
            cell = report["scores"][row][col]
            for key in ("subject_right", "style_right"):
                assert cell[key] is None or 0.0 <= cell[key] <= 1.0
    # the single LoRAs draw what they were trained on (the bundled figures are far above these bars)
    assert report["scores"]["subject LoRA alone"]["subject alone"]["subject_right"] >= 0.5
    assert report["scores"]["style LoRA alone"]["style alone"]["style_right"] >= 0.5
    assert report["seconds"]["total"] > 0


def test_demo_refuses_a_style_lora_given_as_the_subject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "x"), "--subject", "zebra_zwx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--subject must name a bundled subject LoRA" in err[0]
    assert not (tmp_path / "x").exists()


def test_demo_refuses_an_unknown_lora_name_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "x"), "--style", "no_such_style"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zebra_zwx" in err[0]
    assert not (tmp_path / "x").exists()
