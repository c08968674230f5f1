"""The suite's LoRAs: random kohya SDXL LoRAs (every attention/FF Linear of the UNet's transformer blocks plus
the first text-encoder layers of both encoders), each with its trigger words, written into the scratch Lora
folder the WebUI is started with."""

from __future__ import annotations

from pathlib import Path

from ziplora.formats import Family, LayerKey
from ziplora.synthetic import attention_layers, write_random_lora

SUBJECT, STYLE, USER = "e2e_subject", "e2e_style", "e2e_user"
TRIGGERS = {SUBJECT: "sks dog", STYLE: "zwx watercolor", USER: "qqz user"}
_TE_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def text_encoder_layers(blocks: int = 2) -> list[LayerKey]:
    """The first ``blocks`` layers of CLIP-L (te1) and bigG (te2): q/k/v/out (A1111 applies a te2 attention
    LoRA only as a complete set) and the MLP."""
    return [LayerKey(te, f"text_model.encoder.layers.{i}.{part}") for te in ("te1", "te2") for i in range(blocks) for part in _TE_PARTS]


def write_test_loras(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    keys = attention_layers(Family.SDXL) + text_encoder_layers()
    out = {}
    for seed, name in enumerate((SUBJECT, STYLE, USER), start=11):
        out[name] = write_random_lora(
            folder / f"{name}.safetensors", keys, Family.SDXL, rank=4, seed=seed, scale=0.05,
            metadata={"ss_output_name": name, "modelspec.trigger_phrase": TRIGGERS[name], "ss_network_dim": "4", "ss_network_alpha": "4"},
        )  # fmt: skip
    return out
