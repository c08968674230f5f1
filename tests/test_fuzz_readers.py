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
_SEED = save_bytes(
    {k: v.half() for k, v in random_lora_tensors([Q, CONV, TE], Family.SDXL, 2, 0).items()}, {"ss_base_model_version": "sdxl_base_v1-0"}
)

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
# metadata values that are JSON inside a string (kohya's ss_tag_frequency, diffusers' lora_adapter_metadata), hostile too:
# nested thousands deep (RecursionError in json), NaN and 1e999 (json's inf) where counts and alphas go
_JSON_TEXT = st.sampled_from([
    "{", '{"a": {"b": 1}}', "[" * 5000, '{"a": ' * 3000, '{"img": {"sks": NaN, "dog": 1e999, "cat": -1e999}}',
    '{"unet.lora_alpha": NaN, "unet.alpha_pattern": {"to_q": 1e999, "(": 2}}', '{"unet.alpha_pattern": {"[": 1}}',
    '{"unet.lora_alpha": "4", "text_encoder.lora_alpha": [1]}', "null", "[]", '"text"',
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
        entries["__metadata__"] = draw(st.one_of(st.dictionaries(st.sampled_from(["ss_base_model_version", "ss_v2", "ss_tag_frequency", "modelspec.trigger_phrase",
                                                                                  "lora_adapter_metadata"]),
                                                                 st.one_of(st.text(max_size=20), _JSON_TEXT, st.integers())),
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


# -- beside a file: the A1111 sidecar ---------------------------------------------------------------------------


@FUZZ
@given(sidecar=st.one_of(_JSON_TEXT, st.binary(max_size=256).map(lambda b: b.decode("latin-1")),
                         st.recursive(st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=8)),
                                      lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(
                                          st.sampled_from(["activation text", "sd version", "preferred weight", "x"]), kids, max_size=3)),
                                      max_leaves=8).map(lambda v: __import__("json").dumps(v))))  # fmt: skip
def test_any_sidecar_beside_a_good_file(tmp_path: Path, sidecar: str) -> None:
    (tmp_path / "fuzz.json").write_text(sidecar, encoding="utf-8", errors="surrogatepass")
    _check(tmp_path, _SEED)


# -- the mergers file beside a ZipLoRA output (read by a re-export) ----------------------------------------------

_MERGER_KEYS = st.sampled_from([
    '[["unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"]]', '[["vae", "x"]]', '[["unet"]]', "[[1, 2]]", "[" * 4000, "{}",
    '[["te2", "text_model.encoder.layers.0.self_attn.q_proj"], ["unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"]]',
])  # fmt: skip
_PROVENANCE = st.sampled_from([
    '{"method": "ziplora"}', '{"method": "ziplora", "content_weight": "x"}', '{"method": "ziplora", "content_weight": NaN}',
    '{"method": "ziplora", "target_rank": 0.5}', '{"nope": 1}', "[]", "{" * 4000, '{"method": "ziplora", "content_weight": 1e999}',
])  # fmt: skip


@FUZZ
@given(keys=_MERGER_KEYS, provenance=_PROVENANCE, drop=st.sampled_from(["", "content_path", "style_sha256", "keys"]),
       width=st.sampled_from([0, 1, 640, 641]), value=st.sampled_from([1.0, float("nan"), float("inf")]),
       matrix=st.booleans(), mismatch=st.booleans())  # fmt: skip
def test_any_mergers_file(tmp_path: Path, keys: str, provenance: str, drop: str, width: int, value: float, matrix: bool,
                          mismatch: bool) -> None:  # fmt: skip
    from ziplora.export import load_mergers

    meta = {"ziplora_mergers": "1", "keys": keys, "provenance": provenance, "content_path": "/nowhere/a.safetensors",
            "content_sha256": "0" * 64, "style_path": "/nowhere/b.safetensors", "style_sha256": "1" * 64}  # fmt: skip
    meta.pop(drop, None)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    shape = (width, 2) if matrix else (width,)
    tensors = {f"m_c.{name}": torch.full(shape, value), f"m_s.{name}": torch.full((width + mismatch,), 1.0)}
    path = tmp_path / "fuzz.ziplora"
    path.write_bytes(save_bytes(tensors, meta))
    try:
        saved = load_mergers(path)
    except ZipLoraError as err:
        assert "\n" not in str(err)
        return
    for mc, ms in saved.mergers.values():
        assert mc.dim() == 1 and mc.shape == ms.shape and bool(torch.isfinite(mc).all())


# -- through the writer: whatever the reader accepts, the export writes whole or refuses cleanly --------------------
# Files start as a valid ToyXL layer of one kind (Linear or 3x3 conv) and are then edited a few times (a tensor
# dropped, reshaped, filled with NaN / Inf / huge values, cast, or a stray one added), so many stay writable and the
# rest are near misses; both sides, and the saved mergers a re-export applies, go through ``export_merge``.

_TOY_LINEAR = LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")  # 32x32
_TOY_CONV = LayerKey("unet", "input_blocks.1.0.in_layers.2")  # 32x32x3x3
_EDIT = st.tuples(
    st.sampled_from(["drop", "resize", "squeeze", "unsqueeze", "fill", "cast", "stray"]),
    st.integers(0, 7),
    st.sampled_from([0, 1, 2, 3, 33, 64]),
    st.sampled_from([float("nan"), float("inf"), 1e4, 0.0, -3.0]),
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8]),
    st.sampled_from([".lora_mid.weight", ".scale", ".alpha", ".dora_scale", ".hada_t1", ".lokr_t2", ".diff_b", ".bias"]),
)


def _edited(tensors: dict[str, torch.Tensor], edits: list[tuple]) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    out = dict(tensors)
    for op, index, size, value, dtype, stray in edits:
        if not out:
            break
        name = sorted(out)[index % len(out)]
        t = out[name]
        if op == "drop":
            del out[name]
        elif op == "resize" and t.dim():
            shape = list(t.shape)
            shape[index % t.dim()] = size
            out[name] = torch.randn(shape).to(t.dtype)
        elif op == "squeeze":
            out[name] = t.reshape(-1)[:1].reshape(()) if t.numel() else t.reshape(-1)
        elif op == "unsqueeze":
            out[name] = t.unsqueeze(index % (t.dim() + 1))
        elif op == "fill" and t.numel():
            out[name] = t.clone().reshape(-1).index_fill_(0, torch.tensor([0]), value).reshape(t.shape) if t.is_floating_point() else t
        elif op == "cast":
            out[name] = t.to(dtype)
        elif op == "stray":
            prefix = name.split(".")[0]
            out[prefix + stray] = torch.ones(2, 2, 3, 3) if stray.endswith(("mid.weight", "_t1", "_t2")) else torch.ones(())
    return out


@FUZZ
@given(kind=st.sampled_from(["lora", "loha", "lokr", "full"]), conv=st.booleans(), rank=st.sampled_from([1, 2, 4]),
       edits=st.lists(_EDIT, max_size=3), target_rank=st.sampled_from([None, 1, 3]),
       mergers=st.sampled_from([None, 32, 31, "nan"]))  # fmt: skip
def test_what_the_reader_accepts_the_writer_writes_or_refuses(tmp_path: Path, kind: str, conv: bool, rank: int, edits: list[tuple],  # type: ignore[type-arg]
                                                              target_rank: int | None, mergers: int | str | None) -> None:  # fmt: skip
    from ziplora.export import ExportOptions, export_merge
    from ziplora.metadata import Provenance

    key = _TOY_CONV if conv else _TOY_LINEAR
    base = random_lora_tensors([key], Family.TOYXL, rank, seed=1, kind=kind, scale=0.3)
    path, style_path = tmp_path / "fuzz.safetensors", tmp_path / "style.safetensors"
    path.write_bytes(save_bytes(_edited(base, edits), {"ss_base_model_version": "toyxl_v1"}))
    style_path.write_bytes(
        save_bytes(random_lora_tensors([key], Family.TOYXL, 2, seed=2, scale=0.3), {"ss_base_model_version": "toyxl_v1"})
    )
    out = tmp_path / "out.safetensors"
    out.unlink(missing_ok=True)
    saved = None
    if mergers is not None:
        width = 32 if mergers == "nan" else int(mergers)
        m = torch.full((width,), float("nan") if mergers == "nan" else 0.5)
        saved = {key: (m, torch.ones(width))}
    tracemalloc.start()
    try:
        content = open_lora(path, expect=Family.TOYXL)
        export_merge(content, open_lora(style_path, expect=Family.TOYXL), out,
                     ExportOptions(target_rank=target_rank, write_sidecar=False), Provenance("direct"), saved)  # fmt: skip
    except ZipLoraError as err:
        assert "\n" not in str(err)
        assert not out.exists()
    else:
        assert len(open_lora(out, expect=Family.TOYXL).keys) == 1
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MAX_ALLOC, peak
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
