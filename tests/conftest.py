"""Shared fixtures: small synthetic LoRAs of every kind and a toy host on an untrained ToyXL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests run on 2 cores, often beside other work: one intra-op thread avoids OpenMP barrier stalls.
torch.set_num_threads(int(os.environ.get("ZIPLORA_TEST_THREADS", "1")))

from ziplora.formats import Family, LayerKey  # noqa: E402
from ziplora.synthetic import attention_layers, write_random_lora  # noqa: E402


@pytest.fixture(scope="session")
def toy_keys() -> list[LayerKey]:
    return attention_layers(Family.TOYXL)


@pytest.fixture(scope="session")
def untrained_model():
    from ziplora.toy.pipeline import untrained_toy

    return untrained_toy(seed=0)


@pytest.fixture()
def lora_dir(tmp_path: Path, toy_keys: list[LayerKey]) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    write_random_lora(folder / "subject.safetensors", toy_keys, Family.TOYXL, rank=4, seed=1, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "sks shape"})  # fmt: skip
    write_random_lora(folder / "style.safetensors", toy_keys, Family.TOYXL, rank=4, seed=2, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "zwx style"})  # fmt: skip
    return folder


@pytest.fixture()
def toy_host(lora_dir: Path, untrained_model):
    from ziplora.hosts.toy import ToyHost

    return ToyHost(lora_dir, model=untrained_model)


def state_hash(module: torch.nn.Module) -> dict[str, bytes]:
    """Every parameter and buffer, by name, as bytes: equal dicts mean a bit-identical model."""
    return {k: v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() for k, v in module.state_dict().items()}
