"""SDXL's layout in its own room: the pinned SDXL-base module list against the classes, and no formats -> toy import."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from ziplora.architecture.clip_text import CLIPTextModel, TextEncoderConfig
from ziplora.architecture.sdxl_base import SDXL_BASE_FILE, sdxl_base_shapes
from ziplora.architecture.sgm_unet import UNetConfig, UNetModel
from ziplora.architecture.shapes import encoder_layer_shapes, weight_shapes
from ziplora.formats import Family, LayerKey, reference_shapes


def test_the_pinned_sdxl_base_list_is_what_the_sdxl_configurations_build() -> None:
    """Golden test: the data the readers accept and the classes the benchmarks build must agree, entry for entry."""
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.sdxl_base())
        te1 = CLIPTextModel(TextEncoderConfig.sdxl_te1())
        te2 = CLIPTextModel(TextEncoderConfig.sdxl_te2())
    pinned = sdxl_base_shapes()
    assert list(pinned["unet"].items()) == list(weight_shapes(unet).items())
    assert list(pinned["te1"].items()) == list(encoder_layer_shapes(te1).items())
    assert list(pinned["te2"].items()) == list(encoder_layer_shapes(te2, with_projection=True).items())


def test_the_pinned_list_is_sdxl_bases_and_is_what_the_formats_accept() -> None:
    pinned = sdxl_base_shapes()
    assert {c: len(s) for c, s in pinned.items()} == {"unet": 794, "te1": 72, "te2": 193}
    assert pinned["unet"]["input_blocks.4.1.transformer_blocks.0.attn2.to_k"] == (640, 2048)  # cross-attention on 2048-wide context
    assert pinned["unet"]["output_blocks.2.2.conv"] == (1280, 1280, 3, 3)  # the first upsampler sits after the transformer
    assert pinned["te2"]["text_projection"] == (1280, 1280)
    assert pinned["te1"]["text_model.encoder.layers.11.mlp.fc1"] == (3072, 768)
    raw = json.loads(SDXL_BASE_FILE.read_text(encoding="utf-8"))
    assert set(raw) == {"about", "unet", "te1", "te2"}
    expected = {LayerKey(c, p): s for c, shapes in pinned.items() for p, s in shapes.items()}
    assert reference_shapes(Family.SDXL) == expected


def test_the_formats_read_both_families_without_the_toy_world() -> None:
    code = (
        "import sys\n"
        "from ziplora.formats import Family, reference_shapes\n"
        "from ziplora.formats.keys import sdxl_unet_module_paths\n"
        "assert len(reference_shapes(Family.SDXL)) == 1059 and len(reference_shapes(Family.TOYXL)) == 239\n"
        "assert 'input_blocks.4.1.transformer_blocks.0.attn1.to_q' in sdxl_unet_module_paths()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('ziplora.toy'))\n"
        "assert not loaded, loaded\n"
    )
    # a fresh interpreter (this one has imported the toy world already); importing torch is slow on a busy machine
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
