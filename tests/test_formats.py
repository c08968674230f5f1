"""Readers: every format SDXL users have, written by the tests, read into the canonical model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ziplora.errors import LoraFormatError, UnsupportedLoraError, WrongBaseModelError
from ziplora.formats import Family, LayerKey, open_lora, reference_shapes
from ziplora.formats.keys import diffusers_unet_to_sgm, sdxl_unet_module_paths, sgm_unet_to_diffusers, underscored_to_path
from ziplora.synthetic import attention_layers, random_lora_tensors

SDXL = Family.SDXL
Q = LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
K2 = LayerKey("unet", "output_blocks.2.1.transformer_blocks.9.attn2.to_k")
CONV = LayerKey("unet", "output_blocks.0.0.in_layers.2")
SMALL_CONV = LayerKey("unet", "input_blocks.1.0.in_layers.2")
TE1 = LayerKey("te1", "text_model.encoder.layers.3.self_attn.q_proj")
TE2 = LayerKey("te2", "text_model.encoder.layers.30.mlp.fc1")


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_kohya_lora_locon_and_text_encoders(tmp_path: Path) -> None:
    tensors = random_lora_tensors([Q, K2, CONV, TE1, TE2], SDXL, rank=4, seed=0, alpha=2.0)
    lora = open_lora(_save(tmp_path / "a.safetensors", tensors))
    assert lora.family == SDXL
    assert set(lora.keys) == {Q, K2, CONV, TE1, TE2}
    assert lora.layer_kind(CONV) == "locon"
    conv = lora.layer(CONV)
    assert conv.shape == (1280, 2560, 3, 3)
    assert conv.scale() == pytest.approx(0.5)
    f = conv.exact_factors()
    expected = (
        torch.einsum(
            "or,rikl->oikl",
            tensors["lora_unet_output_blocks_0_0_in_layers_2.lora_up.weight"][:, :, 0, 0],
            tensors["lora_unet_output_blocks_0_0_in_layers_2.lora_down.weight"],
        )
        * 0.5
    )
    torch.testing.assert_close(f.dense(), expected)
    summary = lora.summary()
    assert (summary.unet_layers, summary.te1_layers, summary.te2_layers) == (3, 1, 1)


def test_tucker_lora_mid(tmp_path: Path) -> None:
    name = "lora_unet_output_blocks_0_0_in_layers_2"
    g = torch.Generator().manual_seed(1)
    t = {
        f"{name}.lora_down.weight": torch.randn(4, 2560, 1, 1, generator=g),
        f"{name}.lora_mid.weight": torch.randn(4, 4, 3, 3, generator=g),
        f"{name}.lora_up.weight": torch.randn(1280, 4, 1, 1, generator=g),
        f"{name}.alpha": torch.tensor(4.0),
    }
    lora = open_lora(_save(tmp_path / "t.safetensors", t))
    layer = lora.layer(CONV)
    assert lora.layer_kind(CONV) == "locon-tucker"
    expected = torch.einsum(
        "n m k l, i n, m j -> i j k l",
        t[f"{name}.lora_mid.weight"],
        t[f"{name}.lora_up.weight"][:, :, 0, 0],
        t[f"{name}.lora_down.weight"][:, :, 0, 0],
    )
    torch.testing.assert_close(layer.dense(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.exact_factors().conventional().dense(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["loha", "lokr", "full"])
def test_lycoris_kinds(tmp_path: Path, kind: str) -> None:
    tensors = random_lora_tensors([Q, SMALL_CONV], SDXL, rank=4, seed=2, kind=kind)
    lora = open_lora(_save(tmp_path / f"{kind}.safetensors", tensors))
    assert lora.layer_kind(Q) == kind
    for key in (Q, SMALL_CONV):
        layer = lora.layer(key)
        dense = layer.dense()
        assert dense.shape == reference_shapes(SDXL)[key]
        f, err, how = layer.factors()
        assert how == ("exact" if kind == "loha" else "svd")
        rel = float((f.dense() - dense).norm() / dense.norm())
        assert rel < 1e-4 and err < 1e-4


def test_loha_exact_form_is_the_hadamard_product(tmp_path: Path) -> None:
    tensors = random_lora_tensors([Q], SDXL, rank=3, seed=3, kind="loha", alpha=1.5)
    layer = open_lora(_save(tmp_path / "h.safetensors", tensors)).layer(Q)
    p = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    w = {k: tensors[f"{p}.{k}"].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    expected = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * 0.5
    f = layer.exact_factors()
    assert f is not None and f.rank == 9
    torch.testing.assert_close(f.dense(), expected, rtol=1e-4, atol=1e-6)


def _diffusers_name(key: LayerKey) -> str:
    if key.component == "unet":
        return "unet." + sgm_unet_to_diffusers(key.path)
    return ("text_encoder." if key.component == "te1" else "text_encoder_2.") + key.path


def test_peft_with_alpha_keys_and_diffusers_names(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    t = {}
    for key in (Q, K2, TE2):
        out_f, in_f = reference_shapes(SDXL)[key]
        n = _diffusers_name(key)
        t[f"{n}.lora_A.weight"] = torch.randn(8, in_f, generator=g)
        t[f"{n}.lora_B.weight"] = torch.randn(out_f, 8, generator=g)
        t[f"{n}.alpha"] = torch.tensor(4.0)
    lora = open_lora(_save(tmp_path / "peft.safetensors", t))
    assert set(lora.keys) == {Q, K2, TE2}
    assert lora.schemes == {"diffusers"}
    assert lora.layer(K2).scale() == pytest.approx(0.5)


def test_peft_alpha_from_metadata(tmp_path: Path) -> None:
    out_f, in_f = reference_shapes(SDXL)[Q]
    n = _diffusers_name(Q)
    t = {f"{n}.lora_A.weight": torch.randn(8, in_f), f"{n}.lora_B.weight": torch.randn(out_f, 8)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 2})}
    lora = open_lora(_save(tmp_path / "peft_meta.safetensors", t, meta))
    assert lora.layer(Q).scale() == pytest.approx(0.25)


def test_old_diffusers_attention_processor_names(tmp_path: Path) -> None:
    out_f, in_f = reference_shapes(SDXL)[Q]
    base = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    t = {
        f"{base}.to_q_lora.down.weight": torch.randn(4, in_f),
        f"{base}.to_q_lora.up.weight": torch.randn(out_f, 4),
        f"{base}.to_out_lora.down.weight": torch.randn(4, in_f),
        f"{base}.to_out_lora.up.weight": torch.randn(out_f, 4),
    }
    lora = open_lora(_save(tmp_path / "old.safetensors", t))
    assert set(lora.keys) == {Q, LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0")}


def test_newer_diffusers_lora_down_names_and_text_encoder(tmp_path: Path) -> None:
    t = {}
    for key in (Q, TE1):
        out_f, in_f = reference_shapes(SDXL)[key]
        n = _diffusers_name(key)
        mid = ".lora_linear_layer" if key.component != "unet" else ".lora"
        t[f"{n}{mid}.down.weight"] = torch.randn(4, in_f)
        t[f"{n}{mid}.up.weight"] = torch.randn(out_f, 4)
    assert set(open_lora(_save(tmp_path / "d.safetensors", t)).keys) == {Q, TE1}


def test_kohya_diffusers_underscore_names(tmp_path: Path) -> None:
    out_f, in_f = reference_shapes(SDXL)[Q]
    n = "lora_unet_" + sgm_unet_to_diffusers(Q.path).replace(".", "_")
    t = {f"{n}.lora_down.weight": torch.randn(4, in_f), f"{n}.lora_up.weight": torch.randn(out_f, 4), f"{n}.alpha": torch.tensor(4.0)}
    lora = open_lora(_save(tmp_path / "kd.safetensors", t))
    assert lora.keys == [Q] and lora.schemes == {"kohya-diffusers"}


def test_diffusers_sgm_mapping_is_a_bijection_on_every_weight_layer() -> None:
    shapes = reference_shapes(SDXL)
    unet_layers = [k.path for k in shapes if k.component == "unet"]
    assert len(unet_layers) > 700
    for path in unet_layers:
        d = sgm_unet_to_diffusers(path)
        assert d is not None, path
        assert diffusers_unet_to_sgm(d) == path
    # the known SDXL specifics: the upsampler and the first attention block
    assert diffusers_unet_to_sgm("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert diffusers_unet_to_sgm("down_blocks.1.attentions.0.proj_in") == "input_blocks.4.1.proj_in"
    assert "input_blocks.4.1.transformer_blocks.0.attn1.to_q" in sdxl_unet_module_paths()


def test_underscored_names_round_trip_for_every_layer() -> None:
    for key in reference_shapes(SDXL):
        assert underscored_to_path(key.path.replace(".", "_")) == key.path


def test_bundled_embeddings_are_kept_apart(tmp_path: Path) -> None:
    t = random_lora_tensors([Q], SDXL, rank=2, seed=5)
    t["bundle_emb.sksdog.clip_l"] = torch.randn(2, 768)
    t["bundle_emb.sksdog.clip_g"] = torch.randn(2, 1280)
    lora = open_lora(_save(tmp_path / "emb.safetensors", t))
    assert {k: sorted(v) for k, v in lora.embeddings.items()} == {"sksdog": ["bundle_emb.sksdog.clip_g", "bundle_emb.sksdog.clip_l"]}


def test_trigger_words_from_sidecar_then_modelspec_then_tags(tmp_path: Path) -> None:
    t = random_lora_tensors([Q], SDXL, rank=2, seed=6)
    meta = {"ss_tag_frequency": json.dumps({"10_sks dog": {"sks": 10, "dog": 10, "grass": 2}})}
    path = _save(tmp_path / "tw.safetensors", t, meta)
    assert open_lora(path).trigger_words[:2] == ["sks", "dog"]
    _save(path, t, {**meta, "modelspec.trigger_phrase": "sks dog"})
    assert open_lora(path).trigger_words == ["sks dog"]
    path.with_suffix(".json").write_text(json.dumps({"activation text": "photo of sks dog, grass"}))
    assert open_lora(path).trigger_words == ["photo of sks dog", "grass"]


def test_toy_family_and_sdxl_family_are_told_apart(tmp_path: Path) -> None:
    toy = random_lora_tensors(attention_layers(Family.TOYXL)[:4], Family.TOYXL, rank=2, seed=7)
    lora = open_lora(_save(tmp_path / "toy.safetensors", toy, {"ss_base_model_version": "toyxl_v1"}))
    assert lora.family == Family.TOYXL
    with pytest.raises(WrongBaseModelError, match="ToyXL, not SDXL"):
        open_lora(tmp_path / "toy.safetensors", expect=Family.SDXL)


# ---------------------------------------------------------------------------------------------------------
# bad files: our own error, one line, nothing else


def _sd15_lora() -> dict[str, torch.Tensor]:
    n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    return {f"{n}.lora_down.weight": torch.randn(4, 768), f"{n}.lora_up.weight": torch.randn(320, 4), f"{n}.alpha": torch.tensor(4.0)}


@pytest.mark.parametrize(
    ("tensors", "family"),
    [
        (_sd15_lora(), "SD1.x"),
        ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 1024),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1024, 4)}, "SD2.x"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 3072),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(9216, 4)}, "Flux"),
        ({"transformer.joint_blocks.0.x_block.attn.qkv.lora_A.weight": torch.randn(4, 1536),
          "transformer.joint_blocks.0.x_block.attn.qkv.lora_B.weight": torch.randn(4608, 4)}, "SD3"),
    ],
)  # fmt: skip
def test_other_families_are_refused_by_name(tmp_path: Path, tensors: dict[str, torch.Tensor], family: str) -> None:
    path = _save(tmp_path / "other.safetensors", tensors)
    with pytest.raises(WrongBaseModelError, match=f"for {family}, not SDXL"):
        open_lora(path, expect=Family.SDXL)


def test_refiner_lora_is_refused(tmp_path: Path) -> None:
    n = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    t = {f"{n}.lora_down.weight": torch.randn(4, 1280), f"{n}.lora_up.weight": torch.randn(768, 4)}
    with pytest.raises(WrongBaseModelError, match="SDXL refiner"):
        open_lora(_save(tmp_path / "refiner.safetensors", t), expect=Family.SDXL)


def test_checkpoint_is_not_a_lora(tmp_path: Path) -> None:
    t = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(320, 4, 3, 3)}
    with pytest.raises(LoraFormatError, match="checkpoint, not a LoRA"):
        open_lora(_save(tmp_path / "ckpt.safetensors", t))


def test_dora_is_refused_clearly(tmp_path: Path) -> None:
    t = random_lora_tensors([Q], SDXL, rank=2, seed=8)
    t["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.dora_scale"] = torch.ones(1, 640)
    with pytest.raises(UnsupportedLoraError, match="DoRA"):
        open_lora(_save(tmp_path / "dora.safetensors", t))


def test_shape_mismatch_between_up_and_down(tmp_path: Path) -> None:
    n = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    t = {f"{n}.lora_down.weight": torch.randn(4, 640), f"{n}.lora_up.weight": torch.randn(640, 8)}
    lora = open_lora(_save(tmp_path / "mm.safetensors", t))
    with pytest.raises(LoraFormatError, match="mismatched shapes"):
        lora.layer(Q)


def test_delta_shape_that_does_not_fit_the_model(tmp_path: Path) -> None:
    n = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    t = {f"{n}.lora_down.weight": torch.randn(4, 640), f"{n}.lora_up.weight": torch.randn(640, 4),
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 2048),
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(512, 4)}  # fmt: skip
    with pytest.raises(WrongBaseModelError):
        open_lora(_save(tmp_path / "bad_shape.safetensors", t), expect=Family.SDXL)


def test_nan_weights(tmp_path: Path) -> None:
    t = random_lora_tensors([Q], SDXL, rank=2, seed=9)
    t["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight"][0, 0] = float("nan")
    lora = open_lora(_save(tmp_path / "nan.safetensors", t))
    with pytest.raises(LoraFormatError, match="NaN or Inf"):
        lora.layer(Q)


def test_duplicate_layer_in_two_naming_schemes(tmp_path: Path) -> None:
    t = random_lora_tensors([Q], SDXL, rank=2, seed=10)
    n = "lora_unet_" + sgm_unet_to_diffusers(Q.path).replace(".", "_")
    t[f"{n}.lora_down.weight"] = torch.randn(2, 640)
    t[f"{n}.lora_up.weight"] = torch.randn(640, 2)
    with pytest.raises(LoraFormatError, match="appears twice"):
        open_lora(_save(tmp_path / "dup.safetensors", t))


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    good = _save(tmp_path / "good.safetensors", random_lora_tensors([Q], SDXL, rank=2, seed=11))
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFormatError, match="truncated|outside the file"):
        open_lora(tmp_path / "trunc.safetensors")
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    with pytest.raises(LoraFormatError, match="too short"):
        open_lora(tmp_path / "short.safetensors")
    corrupt = bytearray(data)
    corrupt[10:20] = b"\xff" * 10
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(corrupt))
    with pytest.raises(LoraFormatError, match="corrupt header"):
        open_lora(tmp_path / "corrupt.safetensors")
    huge = (2**40).to_bytes(8, "little") + b"{}"
    (tmp_path / "huge.safetensors").write_bytes(huge)
    with pytest.raises(LoraFormatError, match="not a safetensors file|truncated"):
        open_lora(tmp_path / "huge.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(LoraFormatError, match="empty"):
        open_lora(tmp_path / "empty.safetensors")
    _save(tmp_path / "none.safetensors", {})
    with pytest.raises(LoraFormatError, match="no tensors"):
        open_lora(tmp_path / "none.safetensors")


class _Boom:
    """Unpickling this would create a marker file: the test proves we never unpickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".safetensors"])
def test_pickles_are_refused_and_never_unpickled(tmp_path: Path, suffix: str) -> None:
    import pickle

    marker = tmp_path / "unpickled"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps({"x": _Boom(str(marker))}, protocol=4))
    with pytest.raises(LoraFormatError, match="pickle"):
        open_lora(path)
    assert not marker.exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LoraFormatError, match="no such file"):
        open_lora(tmp_path / "nope.safetensors")
