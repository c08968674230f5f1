"""The quality benchmark's report: docs/quality.md is computed from the run's figures, never written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ziplora.toy.quality import METHODS, run_quality, write_quality_docs


def _result(both: float, subject: float = 0.5, style: float = 0.5) -> dict:
    return {"both": {"both_right": both, "subject_right": subject, "style_right": style},
            "retention_subject": 0.5, "retention_style": 1.0}  # fmt: skip


def _data() -> dict:
    rows = []
    for i, (direct, zipped) in enumerate([(0.25, 0.5), (0.5, 0.5), (0.75, 0.25)]):
        results = {m.name: _result(0.4) for m in METHODS}
        results["direct"], results["zip_dot"] = _result(direct), _result(zipped)
        rows.append({"subject": f"s{i}", "style": f"t{i}", "results": results,
                     "ziplora": {"zip_dot": {"steps": 100, "similarity_after": 0.8, "movement": 0.3, "share_below_0_1": 0.02, "seconds": 7.0}}})  # fmt: skip
    summary = {m.name: {"subject_right": 0.5, "style_right": 0.5, "both_right": 0.4, "retention_subject": 0.5, "retention_style": 1.0}
               for m in METHODS}  # fmt: skip
    summary["zip_dot"]["both_right"] = 0.125
    return {"date": "2026-01-02", "pairs": 3, "seeds_per_cell": 16, "steps": 100, "rows": rows, "summary": summary,
            "seconds": 12.0, "machine": "test"}  # fmt: skip


def test_the_report_states_what_the_figures_say(tmp_path: Path) -> None:
    data = _data()
    write_quality_docs(data, tmp_path)
    text = (tmp_path / "quality.md").read_text()
    assert json.loads((tmp_path / "quality.json").read_text()) == data
    assert "(2026-01-02; 3 pairs x 16 seeds per cell" in text
    # per pair against the direct merge: 0.5 > 0.25, 0.5 == 0.5, 0.25 < 0.75
    assert "ZipLoRA is better in 1, equal in 1, worse in 1 of 3" in text
    assert "| s2 x t2 | 75% | 40% | 25% |" in text
    assert "both right, in 12% of images" in text
    # the similarity terms' bars are escaped, so the tables keep their columns
    table_rows = [line for line in text.splitlines() if line.startswith("| ZipLoRA, ")]
    assert table_rows and all(line.replace("\\|", "").count("|") == 7 for line in table_rows[:2])


@pytest.mark.slow
def test_a_quick_run_measures_every_method_on_one_pair() -> None:
    data = run_quality(quick=True, log=lambda *a: None)
    assert data["pairs"] == 1 and data["seeds_per_cell"] == 4
    for m in METHODS:
        both = data["summary"][m.name]["both_right"]
        assert both is not None and 0.0 <= both <= 1.0
    row = data["rows"][0]
    assert row["results"]["weighted"]["weights"][0] in (0.5, 0.75, 1.0)
    assert row["ziplora"]["zip_dot"]["steps"] >= 1 and row["ziplora"]["zip_dot"]["movement"] > 0
