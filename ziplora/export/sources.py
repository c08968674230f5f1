"""The two inputs as the written file sees them: checks that they can be merged, their bundled embeddings.

Every bundled embedding (``bundle_emb.*``) of both sources is carried into the merged file unchanged; one name
bundled by both with different vectors is an error (DESIGN, "Ecosystem conventions").
"""

from __future__ import annotations

import functools

import torch

from ziplora.errors import IncompatibleLorasError
from ziplora.formats.lorafile import LoraFile
from ziplora.formats.safetensors_io import PendingTensor

__all__ = ["check_merge_sources", "check_embeddings", "embedding_tensors"]


def check_merge_sources(content: LoraFile, style: LoraFile) -> None:
    """Both inputs must be for the same model, and not the same file twice."""
    if content.family != style.family:
        raise IncompatibleLorasError(f"{content.name} is for {content.family.label} but {style.name} is for {style.family.label}")
    if content.data_hash == style.data_hash:
        raise IncompatibleLorasError(f"{content.name} and {style.name} hold the same weights; pick two different LoRAs")


def _same_embedding(a: LoraFile, b: LoraFile, name: str) -> bool:
    ka, kb = sorted(a.embeddings[name]), sorted(b.embeddings[name])
    if ka != kb:
        return False
    return all(torch.equal(a.st.read(k), b.st.read(k)) for k in ka)


def check_embeddings(content: LoraFile, style: LoraFile) -> None:
    for name in sorted(set(content.embeddings) & set(style.embeddings)):
        if not _same_embedding(content, style, name):
            raise IncompatibleLorasError(f"both LoRAs bundle an embedding named {name!r} with different vectors; rename one first")


def embedding_tensors(content: LoraFile, style: LoraFile) -> list[PendingTensor]:
    """Both sources' bundled embeddings as they are, each once (a copy both carry was checked equal)."""
    pending = []
    for lora in (content, style):
        for emb_name, tkeys in sorted(lora.embeddings.items()):
            if lora is style and emb_name in content.embeddings:
                continue  # identical copy, checked above
            for tkey in sorted(tkeys):
                info = lora.st.tensors[tkey]
                pending.append(PendingTensor(tkey, lora.st.read(tkey).dtype, info.shape, functools.partial(lora.st.read, tkey)))
    return pending
