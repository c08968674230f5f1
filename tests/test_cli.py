"""The command line: every bad input exits 2 with one line on stderr and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ziplora.cli import main
from ziplora.formats import Family, LayerKey
from ziplora.synthetic import random_lora_tensors, write_random_lora

Q = LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
K = LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn2.to_k")


@pytest.fixture()
def sdxl_pair(tmp_path: Path) -> tuple[Path, Path]:
    c = write_random_lora(tmp_path / "subject.safetensors", [Q, K], Family.SDXL, rank=4, seed=1,
                          metadata={"modelspec.trigger_phrase": "sks dog"})  # fmt: skip
    s = write_random_lora(tmp_path / "style.safetensors", [Q], Family.SDXL, rank=8, seed=2,
                          metadata={"modelspec.trigger_phrase": "zwx style"})  # fmt: skip
    return c, s


def _run(args: list[str], capsys) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_inspect_text_and_json(sdxl_pair: tuple[Path, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = _run(["inspect", str(sdxl_pair[0])], capsys)
    assert code == 0
    assert "SDXL" in out and "rank 4" in out and "sks dog" in out and "UNet 2" in out
    code, out, _ = _run(["inspect", str(sdxl_pair[1]), "--json", "--layers"], capsys)
    data = json.loads(out)
    assert data["family"] == "SDXL" and data["ranks"] == [8] and data["layers"]["unet"] == 1
    assert data["per_layer"][0]["kind"] == "lora" and data["per_layer"][0]["alpha"] == 8.0


def test_direct_merge_writes_file_sidecar_and_tag(sdxl_pair: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    code, stdout, err = _run(["merge", "--method", "direct", "--content", str(sdxl_pair[0]), "--style", str(sdxl_pair[1]),
                              "--out", str(out), "--style-multiplier", "0.6"], capsys)  # fmt: skip
    assert code == 0, err
    assert "<lora:merged:1> sks dog, zwx style" in stdout
    assert _files(out.parent) == ["merged.json", "merged.safetensors"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--style-multiplier", "3"], "style multiplier must be between 0 and 1.5"),
        (["--rank", "0"], "target rank must be between"),
        (["--out", "OUT/../../evil.safetensors"], None),
    ],
)
def test_bad_options(sdxl_pair: tuple[Path, Path], tmp_path: Path, capsys, extra: list[str], message: str | None) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o" / "x.safetensors"
    out.parent.mkdir()
    args = ["merge", "--method", "direct", "--content", str(sdxl_pair[0]), "--style", str(sdxl_pair[1]), "--out", str(out), *extra]
    code, _, err = _run(args, capsys)
    if message is None:  # a path given to --out is fine as a path; only its file name is the output name
        assert code in (0, 2)
        return
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert _files(out.parent) == []


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(sdxl_pair: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    outdir = tmp_path / "o"
    outdir.mkdir()
    out = outdir / "x.safetensors"
    sd15 = tmp_path / "sd15.safetensors"
    n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{n}.lora_down.weight": torch.randn(4, 768), f"{n}.lora_up.weight": torch.randn(320, 4)}, str(sd15))
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(sdxl_pair[0].read_bytes()[:-64])
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04\x95")
    nan = tmp_path / "nan.safetensors"
    t = random_lora_tensors([Q], Family.SDXL, 4, 3)
    t[next(iter(t))][0] = float("nan")
    save_file(t, str(nan))
    cases = [
        (["--content", str(sd15)], "for SD1.x, not SDXL"),
        (["--content", str(truncated)], "truncated"),
        (["--content", str(pickle_file)], "pickle"),
        (["--content", str(nan)], "NaN"),
        (["--content", str(tmp_path / "missing.safetensors")], "no such file"),
        (["--style", str(sdxl_pair[0])], "same weights"),
    ]
    for override, message in cases:
        args = {"--content": str(sdxl_pair[0]), "--style": str(sdxl_pair[1])}
        args[override[0]] = override[1]
        argv = ["merge", "--method", "direct", "--content", args["--content"], "--style", args["--style"], "--out", str(out)]
        code, _, err = _run(argv, capsys)
        assert code == 2, (override, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (override, err)
        assert "Traceback" not in err
        assert _files(outdir) == [], override


def test_existing_output_is_not_overwritten_unless_asked(sdxl_pair: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    argv = ["merge", "--method", "direct", "--content", str(sdxl_pair[0]), "--style", str(sdxl_pair[1]), "--out", str(out)]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "already exists" in err
    assert out.read_bytes() == b"keep me"
    code, _, err = _run([*argv, "--overwrite"], capsys)
    assert code == 0 and out.read_bytes() != b"keep me"


def test_output_name_with_bad_characters(sdxl_pair: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = [
        "merge",
        "--method",
        "direct",
        "--content",
        str(sdxl_pair[0]),
        "--style",
        str(sdxl_pair[1]),
        "--out",
        str(tmp_path / "a:b.safetensors"),
    ]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "plain file name" in err


def test_argparse_errors_are_one_line_too(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        main(["merge", "--content", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required" in err


def test_zip_merge_and_reexport_on_the_toy_host(lora_dir: Path, untrained_model, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import ziplora.hosts.toy as toy

    monkeypatch.setattr(toy.ToyHost, "model", property(lambda self: untrained_model))
    out = lora_dir / "zipped.safetensors"
    code, stdout, err = _run(["merge", "--method", "zip", "--host", "toy", "--content", str(lora_dir / "subject.safetensors"),
                              "--style", str(lora_dir / "style.safetensors"), "--out", str(out), "--steps", "5",
                              "--samples", "1", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    data = json.loads(stdout)
    assert data["steps"] == 5 and data["tag"].startswith("<lora:zipped:1>")
    assert (lora_dir / "zipped.ziplora").is_file()
    first = out.read_bytes()
    code, stdout, err = _run(["reexport", str(out), "--style-multiplier", "0.5"], capsys)
    assert code == 0, err
    assert "style multiplier 0.5" in stdout and out.read_bytes() != first
    code, _, err = _run(["reexport", str(out), "--style-multiplier", "9"], capsys)
    assert code == 2 and "between 0 and 1.5" in err


def test_module_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "ziplora", "inspect", "nope.safetensors"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: nope.safetensors: no such file"
