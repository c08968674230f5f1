"""The exact export: the written file, applied the way A1111 applies LoRAs, is the merged delta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.a1111_apply import a1111_delta, module_tensors
from ziplora.errors import IncompatibleLorasError, OutputExistsError
from ziplora.export import ExportOptions, export_merge, load_mergers
from ziplora.formats import Family, LayerKey, kohya_name, open_lora, reference_shapes
from ziplora.formats.safetensors_io import addnet_hash
from ziplora.metadata import Provenance
from ziplora.synthetic import random_lora_tensors

SDXL = Family.SDXL
Q = LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
V2 = LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn2.to_v")
CONV = LayerKey("unet", "input_blocks.1.0.in_layers.2")
ONLY_C = LayerKey("unet", "input_blocks.5.1.proj_in")
ONLY_S = LayerKey("unet", "input_blocks.5.1.proj_out")
TE = LayerKey("te1", "text_model.encoder.layers.0.mlp.fc1")


def _write(path: Path, keys: list[LayerKey], kind: str, rank: int, seed: int, alpha: float) -> Path:
    t = random_lora_tensors(keys, SDXL, rank=rank, seed=seed, kind=kind, alpha=alpha, scale=0.1)
    save_file({k: v.half() for k, v in t.items()}, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return path


def _mergers(keys: list[LayerKey], seed: int) -> dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = reference_shapes(SDXL)
    return {k: (torch.rand(shapes[k][1], generator=g) * 1.5, torch.rand(shapes[k][1], generator=g) * 1.5) for k in keys}


def _expected(content, style, key, mergers, w_c, w_s):  # type: ignore[no-untyped-def]
    total = torch.zeros(reference_shapes(SDXL)[key])
    for lora, w, i in ((content, w_c, 0), (style, w_s, 1)):
        if key not in lora.groups:
            continue
        d = lora.layer(key).dense()
        if mergers is not None and key in mergers:
            m = mergers[key][i]
            d = d * m.reshape(1, -1, *([1] * (d.dim() - 2)))
        total += w * d
    return total


@pytest.mark.parametrize(("kind_c", "kind_s"), [("lora", "lora"), ("loha", "lora"), ("lora", "loha"), ("loha", "loha")])
def test_export_identity_as_a1111_applies_it(tmp_path: Path, kind_c: str, kind_s: str) -> None:
    both = [Q, V2, CONV]
    c = open_lora(_write(tmp_path / "c.safetensors", [*both, ONLY_C, TE], kind_c, 4, 1, alpha=2.0))
    s = open_lora(_write(tmp_path / "s.safetensors", [*both, ONLY_S], kind_s, 8 if kind_s == "lora" else 3, 2, alpha=4.0))
    mergers = _mergers(both, 3)
    out = tmp_path / "merged.safetensors"
    report = export_merge(c, s, out, ExportOptions(style_multiplier=0.7, content_weight=0.9), Provenance("ziplora", 0.9, 0.7), mergers)
    written = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in written.values())
    alphas = {float(v) for k, v in written.items() if k.endswith(".alpha")}
    assert alphas == {report.alpha}  # one alpha for every layer
    shapes = reference_shapes(SDXL)
    for key in [*both, ONLY_C, ONLY_S, TE]:
        delta = a1111_delta(module_tensors(written, kohya_name(key)), shapes[key])
        expected = _expected(c, s, key, mergers, 0.9, 0.7)
        rel = float((delta - expected).norm() / expected.norm())
        assert rel < 2e-3, (key, rel)  # fp16 storage
    assert {r.sources for r in report.layers} == {"both", "content", "style"}
    assert report.relative_error == 0.0  # all exact


def test_direct_merge_is_the_plain_sum_and_mergers_file_round_trips(tmp_path: Path) -> None:
    c = open_lora(_write(tmp_path / "c.safetensors", [Q, CONV], "lora", 4, 1, alpha=4.0))
    s = open_lora(_write(tmp_path / "s.safetensors", [Q, CONV], "lora", 4, 2, alpha=1.0))
    out = tmp_path / "direct.safetensors"
    export_merge(c, s, out, ExportOptions(), Provenance("direct"))
    written = load_file(str(out))
    for key in (Q, CONV):
        delta = a1111_delta(module_tensors(written, kohya_name(key)), reference_shapes(SDXL)[key])
        expected = c.layer(key).dense() + s.layer(key).dense()
        assert float((delta - expected).norm() / expected.norm()) < 2e-3
    assert not out.with_suffix(".ziplora").exists()
    mergers = _mergers([Q, CONV], 5)
    out2 = tmp_path / "zip.safetensors"
    export_merge(c, s, out2, ExportOptions(), Provenance("ziplora"), mergers)
    saved = load_mergers(out2.with_suffix(".ziplora"))
    assert saved.content_sha256 == c.data_hash and saved.style_path == s.path.resolve()
    for key in (Q, CONV):
        assert torch.equal(saved.mergers[key][0], mergers[key][0])


def test_tucker_layers_concatenate_block_diagonally(tmp_path: Path) -> None:
    name = kohya_name(CONV)
    tensors = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        tensors.append({
            f"{name}.lora_down.weight": torch.randn(4, 320, 1, 1, generator=g) * 0.1,
            f"{name}.lora_mid.weight": torch.randn(4, 4, 3, 3, generator=g) * 0.1,
            f"{name}.lora_up.weight": torch.randn(320, 4, 1, 1, generator=g) * 0.1,
            f"{name}.alpha": torch.tensor(2.0),
        })  # fmt: skip
    save_file(tensors[0], str(tmp_path / "c.safetensors"))
    save_file(tensors[1], str(tmp_path / "s.safetensors"))
    c, s = open_lora(tmp_path / "c.safetensors"), open_lora(tmp_path / "s.safetensors")
    mergers = _mergers([CONV], 7)
    out = tmp_path / "tucker.safetensors"
    export_merge(c, s, out, ExportOptions(style_multiplier=0.5), Provenance("ziplora"), mergers)
    written = load_file(str(out))
    assert written[f"{name}.lora_mid.weight"].shape == (8, 8, 3, 3)
    delta = a1111_delta(module_tensors(written, name), reference_shapes(SDXL)[CONV])
    expected = _expected(c, s, CONV, mergers, 1.0, 0.5)
    assert float((delta - expected).norm() / expected.norm()) < 2e-3


def test_target_rank_reports_the_true_svd_error(tmp_path: Path) -> None:
    c = open_lora(_write(tmp_path / "c.safetensors", [Q, V2], "lora", 8, 1, alpha=8.0))
    s = open_lora(_write(tmp_path / "s.safetensors", [Q, V2], "lora", 8, 2, alpha=8.0))
    out = tmp_path / "r4.safetensors"
    report = export_merge(c, s, out, ExportOptions(target_rank=4), Provenance("direct", target_rank=4))
    written = load_file(str(out))
    num = den = 0.0
    for layer in report.layers:
        assert layer.rank == 4 and layer.how == "svd"
        delta = a1111_delta(module_tensors(written, kohya_name(layer.key)), reference_shapes(SDXL)[layer.key])
        exact = c.layer(layer.key).dense() + s.layer(layer.key).dense()
        err = float((delta - exact).norm() / exact.norm())
        assert err == pytest.approx(layer.relative_error, abs=2e-3)
        # Eckart-Young: the best rank-4 error is the energy beyond the 4th singular value
        sv = torch.linalg.svdvals(exact)
        assert layer.relative_error == pytest.approx(float(sv[4:].norm() / sv.norm()), rel=1e-3)
        num += err**2 * float(exact.norm()) ** 2
        den += float(exact.norm()) ** 2
    assert report.relative_error == pytest.approx((num / den) ** 0.5, abs=2e-3)


def test_metadata_sidecar_and_hash(tmp_path: Path) -> None:
    meta_c = {"ss_base_model_version": "sdxl_base_v1-0", "ss_tag_frequency": json.dumps({"10_sks dog": {"sks": 10, "dog": 10}})}
    meta_s = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_tag_frequency": json.dumps({"10_sks dog": {"zwx": 1}}),
        "modelspec.title": "Zebra",
    }
    save_file({k: v.half() for k, v in random_lora_tensors([Q], SDXL, 4, 1).items()}, str(tmp_path / "dog.safetensors"), meta_c)
    save_file({k: v.half() for k, v in random_lora_tensors([Q], SDXL, 4, 2).items()}, str(tmp_path / "zebra.safetensors"), meta_s)
    c, s = open_lora(tmp_path / "dog.safetensors"), open_lora(tmp_path / "zebra.safetensors")
    out = tmp_path / "dog in zebra.safetensors"
    report = export_merge(
        c,
        s,
        out,
        ExportOptions(style_multiplier=0.8),
        Provenance("ziplora", style_multiplier=0.8, steps=100, lam=0.01, lr=0.01, similarity="dot", final_similarity=0.2),
    )
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_output_name"] == "dog in zebra"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.merged_from"] == "dog, Zebra"
    assert meta["ziplora_content_sha256"] == c.data_hash and meta["ziplora_style_sha256"] == s.data_hash
    assert meta["ziplora_style_multiplier"] == "0.8" and meta["ziplora_steps"] == "100"
    assert "sshs_model_hash" not in meta
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags == {"10_sks dog": {"sks": 10, "dog": 10}, "10_sks dog (zebra)": {"zwx": 1}}
    assert report.sha256 == addnet_hash(out)  # what A1111 shows (first 12) and Civitai's AutoV3
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["sd version"] == "SDXL" and sidecar["preferred weight"] == 1.0
    assert "sks" in sidecar["activation text"] and "zwx" in sidecar["activation text"]
    assert set(sidecar) >= {"description", "sd version", "activation text", "preferred weight", "notes"}


def test_refuses_existing_output_and_same_file_twice(tmp_path: Path) -> None:
    c = open_lora(_write(tmp_path / "c.safetensors", [Q], "lora", 4, 1, 4.0))
    s = open_lora(_write(tmp_path / "s.safetensors", [Q], "lora", 4, 2, 4.0))
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError):
        export_merge(c, s, out, ExportOptions(), Provenance("direct"))
    assert out.read_bytes() == b"precious"
    copy = tmp_path / "c2.safetensors"
    copy.write_bytes(c.path.read_bytes())
    with pytest.raises(IncompatibleLorasError, match="same weights"):
        export_merge(c, open_lora(copy), tmp_path / "x.safetensors", ExportOptions(), Provenance("direct"))
    assert not (tmp_path / "x.safetensors").exists()


def test_bundled_embedding_clash_is_an_error_and_distinct_ones_are_carried(tmp_path: Path) -> None:
    tc = {k: v.half() for k, v in random_lora_tensors([Q], SDXL, 4, 1).items()}
    ts = {k: v.half() for k, v in random_lora_tensors([Q], SDXL, 4, 2).items()}
    tc["bundle_emb.sks.clip_l"] = torch.randn(1, 768)
    ts["bundle_emb.zwx.clip_l"] = torch.randn(1, 768)
    save_file(tc, str(tmp_path / "c.safetensors"))
    save_file(ts, str(tmp_path / "s.safetensors"))
    c, s = open_lora(tmp_path / "c.safetensors"), open_lora(tmp_path / "s.safetensors")
    out = tmp_path / "o.safetensors"
    export_merge(c, s, out, ExportOptions(), Provenance("direct"))
    written = load_file(str(out))
    assert torch.equal(written["bundle_emb.sks.clip_l"], tc["bundle_emb.sks.clip_l"])
    assert torch.equal(written["bundle_emb.zwx.clip_l"], ts["bundle_emb.zwx.clip_l"])
    ts["bundle_emb.sks.clip_l"] = torch.randn(1, 768)
    save_file(ts, str(tmp_path / "s.safetensors"))
    with pytest.raises(IncompatibleLorasError, match="embedding named 'sks'"):
        export_merge(c, open_lora(tmp_path / "s.safetensors"), tmp_path / "o2.safetensors", ExportOptions(), Provenance("direct"))
    assert not (tmp_path / "o2.safetensors").exists()


OUT = LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0")  # a Linear with a bias


@pytest.mark.parametrize("method", ["ziplora", "direct"])
def test_a_bias_delta_is_merged_and_written_where_a1111_and_forge_load_it(tmp_path: Path, method: str) -> None:
    """diff_b (LyCORIS full layers) adds b_c·w_c + b_s·w_s to the bias; the layer is written as diff + diff_b, the only
    form A1111's network_full reads a bias delta from (it ignores diff_b next to lora_up / lora_down)."""
    c = open_lora(_write(tmp_path / "c.safetensors", [Q, OUT], "lora", 4, 1, alpha=2.0))
    g = torch.Generator().manual_seed(9)
    bias_s = torch.randn(640, generator=g) * 0.1
    style = {k: v.half() for k, v in random_lora_tensors([Q], SDXL, rank=4, seed=2, scale=0.1).items()}
    style[f"{kohya_name(OUT)}.diff"] = (torch.randn(640, 640, generator=g) * 0.01).half()
    style[f"{kohya_name(OUT)}.diff_b"] = bias_s.half()
    save_file(style, str(tmp_path / "s.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    s = open_lora(tmp_path / "s.safetensors")
    mergers = _mergers([Q, OUT], 4) if method == "ziplora" else None
    out = tmp_path / "merged.safetensors"
    report = export_merge(c, s, out, ExportOptions(content_weight=0.9, style_multiplier=0.7), Provenance(method, 0.9, 0.7), mergers)
    written = load_file(str(out))
    name = kohya_name(OUT)
    assert sorted(k for k in written if k.startswith(name + ".")) == [f"{name}.diff", f"{name}.diff_b"]
    expected = _expected(c, s, OUT, mergers, 0.9, 0.7)
    delta = a1111_delta(module_tensors(written, name), reference_shapes(SDXL)[OUT])
    assert float((delta - expected).norm() / expected.norm()) < 2e-3
    torch.testing.assert_close(written[f"{name}.diff_b"].float(), 0.7 * bias_s.half().float(), rtol=2e-3, atol=1e-4)  # no merger on a bias
    assert f"{kohya_name(Q)}.lora_up.weight" in written and f"{kohya_name(Q)}.alpha" in written  # the rest stays a LoRA
    assert any("diff_b" in note for note in report.notes)
    again = open_lora(out).layer(OUT).factors()[0]  # our own reader reads it back, bias delta included
    torch.testing.assert_close(again.bias, written[f"{name}.diff_b"].float())


def test_a_bias_delta_of_the_wrong_shape_is_refused_in_one_line(tmp_path: Path) -> None:
    name = kohya_name(OUT)
    save_file({f"{name}.diff": torch.zeros(640, 640).half(), f"{name}.diff_b": torch.zeros(5).half()}, str(tmp_path / "b.safetensors"))
    from ziplora.errors import LoraFormatError

    with pytest.raises(LoraFormatError, match=r"diff_b of shape \[5\] is not a bias delta for its 640 output rows") as err:
        open_lora(tmp_path / "b.safetensors").layer(OUT)
    assert "\n" not in str(err.value)
