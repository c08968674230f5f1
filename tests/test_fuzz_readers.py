"""Fuzzing the LoRA readers: any bytes end in a parsed LoRA or our own error, never another exception,
a hang or a large allocation. The default run is bounded; a longer one:

    ZIPLORA_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz_readers.py -p no:randomly
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_bytes

from ziplora.errors import ZipLoraError
from ziplora.formats import Family, LayerKey, open_lora, reference_shapes
from ziplora.synthetic import random_lora_tensors

for _family in (Family.SDXL, Family.TOYXL):
    reference_shapes(_family)  # built once per process: warm the caches so the allocation bound sees only the reader

EXAMPLES = int(os.environ.get("ZIPLORA_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_ALLOC = 64 * 2**20  # no input may make the reader allocate more than this

Q = LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
CONV = LayerKey("unet", "input_blocks.1.0.in_layers.2")
TE = LayerKey("te2", "text_model.encoder.layers.0.self_attn.q_proj")
_SEED = save_bytes({k: v.half() for k, v in random_lora_tensors([Q, CONV, TE], Family.SDXL, 2, 0).items()}, {"ss_base_model_version": "sdxl_base_v1-0"})

_NAMES = st.sampled_from([
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0_mlp_fc1",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "lora_unet_double_blocks_0_img_attn_qkv",
    "model.diffusion_model.input_blocks.0.0", "bundle_emb.x", "lora_unet_", "", "lora_unet_nonsense_block",
])  # fmt: skip
_SUFFIXES = st.sampled_from([
    ".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_mid.weight", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a",
    ".hada_w2_b", ".lokr_w1", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".diff", ".diff_b", ".dora_scale", ".lora_A.weight",
    ".lora_B.weight", ".scale", ".weight", ".oft_blocks", ".clip_l", "",
])  # fmt: skip
_DTYPES = st.sampled_from(["F16", "F32", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F64", "XX", 7, None])
_DIM = st.one_of(st.integers(0, 6), st.sampled_from([640, 2048, 1 << 20, 1 << 40, -1]), st.just("3"))


def _check(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        lora = open_lora(path)
        for key in lora.keys:
            layer = lora.layer(key)
            layer.dense()
            layer.factors()
        lora.summary()
    except ZipLoraError as err:
        assert "\n" not in str(err)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MAX_ALLOC, peak


@st.composite
def _headers(draw) -> bytes:  # type: ignore[no-untyped-def]
    """A safetensors file with a generated header and a data section that may or may not fit it."""
    entries: dict[str, object] = {}
    offset = 0
    for _ in range(draw(st.integers(0, 6))):
        name = draw(_NAMES) + draw(_SUFFIXES)
        shape = draw(st.lists(_DIM, max_size=4))
        dtype = draw(_DTYPES)
        size = draw(st.one_of(st.integers(0, 64), st.just(4 * 640)))
        start = draw(st.one_of(st.just(offset), st.integers(-5, 10_000)))
        end = draw(st.one_of(st.just(start + size), st.integers(-5, 2**50)))
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
        offset = max(offset, end) if isinstance(end, int) and end < 10_000 else offset
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.dictionaries(st.sampled_from(["ss_base_model_version", "ss_v2", "ss_tag_frequency", "modelspec.trigger_phrase"]),
                                                                 st.one_of(st.text(max_size=20), st.just("{"), st.just('{"a": {"b": 1}}'), st.integers())),
                                                 st.integers(), st.text(max_size=5)))  # fmt: skip
    header = json.dumps(entries).encode()
    claimed = draw(st.one_of(st.just(len(header)), st.integers(0, 2**64 - 1)))
    data = draw(st.binary(max_size=4096))
    return struct.pack("<Q", claimed) + header + data


@FUZZ
@given(data=_headers())
def test_generated_headers(tmp_path: Path, data: bytes) -> None:
    _check(tmp_path, data)


@FUZZ
@given(position=st.integers(0, len(_SEED) - 1), value=st.integers(0, 255), cut=st.integers(0, len(_SEED)))
def test_mutated_real_files(tmp_path: Path, position: int, value: int, cut: int) -> None:
    data = bytearray(_SEED)
    data[position] = value
    _check(tmp_path, bytes(data[: max(cut, 9)]))


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes(tmp_path: Path, data: bytes) -> None:
    _check(tmp_path, data)


@FUZZ
@given(tensors=st.dictionaries(st.sampled_from([n + s for n in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",) for s in
                                                  (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_mid.weight", ".hada_w1_a", ".hada_w1_b",
                                                   ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w2", ".diff", ".scale")]),
                               st.tuples(st.lists(st.integers(1, 4), min_size=0, max_size=4), st.sampled_from([1.0, float("nan"), 1e30])),
                               min_size=1, max_size=6))  # fmt: skip
def test_well_formed_files_with_nonsense_layers(tmp_path: Path, tensors: dict[str, tuple[list[int], float]]) -> None:
    real = {k: torch.full(shape, value) for k, (shape, value) in tensors.items()}
    _check(tmp_path, save_bytes(real))


def test_the_seed_file_itself_parses(tmp_path: Path) -> None:
    path = tmp_path / "seed.safetensors"
    path.write_bytes(_SEED)
    assert len(open_lora(path).keys) == 3


@pytest.mark.parametrize("claimed", [2**63, 2**40, 100 * 2**20 + 1])
def test_huge_header_claims_are_refused_before_reading(tmp_path: Path, claimed: int) -> None:
    _check(tmp_path, struct.pack("<Q", claimed) + b"{}")
