"""Stand-ins of the textual-inversion machinery of both WebUIs, on the toy model, for the bundled-embedding tests.

- A1111 v1.10.1: ``modules/textual_inversion/textual_inversion.py`` (``Embedding``, ``EmbeddingDatabase``,
  ``create_embedding_from_data``), ``modules/sd_hijack.py`` ``EmbeddingsWithFixes`` (the token embedding's
  wrapper that splices an embedding's vectors in), ``modules/sd_hijack_clip.py`` ``tokenize_line`` (looks each
  position up with ``find_embedding_at_position``, reserves ``embedding.vectors`` tokens, records the fix).
- Forge 2: ``backend/text_processing/textual_inversion.py`` (``EmbeddingDatabase(tokenizer, expected_shape)``,
  ``register_embedding(embedding)``, ``fixes`` on the database) and ``classic_engine.py``
  (``CLIPEmbeddingForTextualInversion``: the same splice).

The WebUIs' BPE tokenizers give every word ids of its own; the toy tokenizer maps every word it does not know
to ``<unk>``. So the databases here look names up by word ids (``word_ids``: a known word's toy id, an unknown
word a fresh id of its own), and the toy text encoders see ``<unk>`` where a word is unknown and the embedding's
vectors where a database found one. ``bundle_embedding`` writes ``bundle_emb.<name>.clip_l / clip_g`` tensors
into a LoRA file, as pivotal-tuning trainers (kohya's ``--embeddings``, ED-LoRA) ship a subject's trigger.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ziplora.toy.pipeline import TE1_CONFIG, TE2_CONFIG
from ziplora.toy.text import VOCAB

__all__ = [
    "Embedding", "A1111EmbeddingDatabase", "ForgeEmbeddingDatabase", "create_embedding_from_data", "EmbeddingsWithFixes",
    "word_ids", "words_of", "splice_embeddings", "bundle_embedding", "EXPECTED_SHAPE",
]  # fmt: skip

EXPECTED_SHAPE = TE1_CONFIG.width + TE2_CONFIG.width  # SDXL: 768 + 1280 = 2048; the toy: 32 + 64
_WORD = re.compile(r"[a-z0-9]+")
_KNOWN = {w: i for i, w in enumerate(VOCAB)}
_FRESH: dict[str, int] = {}
_PLACEHOLDER = "zzembzz"  # a word the toy does not know: <unk>, where an embedding's vectors go


def words_of(text: str) -> list[str]:
    """The toy tokenizer's words (lower case, tags and punctuation dropped)."""
    return _WORD.findall(re.sub(r"<[^>]*>", " ", text.lower()))


def word_ids(texts: list[str]) -> list[list[int]]:
    """A BPE tokenizer's ``input_ids`` without special tokens, one id per word here."""
    return [[_KNOWN[w] if w in _KNOWN else _FRESH.setdefault(w, 1000 + len(_FRESH)) for w in words_of(t)] for t in texts]


class Embedding:
    """Both WebUIs' ``Embedding`` (A1111's also has ``cached_checksum``, ``filename``, ``hash``, ``shorthash``)."""

    def __init__(self, vec: Any, name: str, step: int | None = None) -> None:
        self.vec = vec
        self.name = name
        self.step = step
        self.shape: int | None = None
        self.vectors = 0
        self.cached_checksum = None
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None
        self.optimizer_state_dict = None
        self.filename: str | None = None
        self.hash = None
        self.shorthash = None


def create_embedding_from_data(data: dict, name: str, filename: str = "unknown embedding file", filepath: str | None = None) -> Embedding:
    """Both WebUIs' ``create_embedding_from_data``: ``string_to_param`` (one term), an SDXL dict with
    ``clip_l`` and ``clip_g`` (shape = their widths added), or a one-tensor diffusers concept; float32."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values())).detach().to(dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().to(dtype=torch.float32) for k, v in data.items()}
        shape, vectors = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    elif isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        vec = (emb.unsqueeze(0) if emb.dim() == 1 else emb).detach().to(dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise Exception(f"Couldn't identify {filename} as neither textual inversion embedding nor diffuser concept.")
    embedding = Embedding(vec, name)
    embedding.step = data.get("step")
    embedding.vectors, embedding.shape = vectors, shape
    if filepath:
        embedding.filename = filepath
    return embedding


class _Database:
    """``EmbeddingDatabase`` of both WebUIs: ``ids_lookup`` (first id -> [(ids, embedding)], longest first),
    ``word_embeddings``, ``skipped_embeddings``, ``expected_shape``; ``find_embedding_at_position``."""

    def __init__(self, expected_shape: int = -1) -> None:
        self.ids_lookup: dict[int, list] = {}
        self.word_embeddings: dict[str, Embedding] = {}
        self.skipped_embeddings: dict[str, Embedding] = {}
        self.expected_shape = expected_shape
        self.embedding_dirs: dict = {}

    def _register(self, embedding: Embedding | None, name: str, ids: list[int]) -> Embedding | None:
        """``register_embedding_by_name`` after the tokenizing (the same code in both WebUIs)."""
        first_id = ids[0]
        if first_id not in self.ids_lookup:
            self.ids_lookup[first_id] = []
        if name in self.word_embeddings:
            lookup = [x for x in self.ids_lookup[first_id] if x[1].name != name]
        else:
            lookup = self.ids_lookup[first_id]
        if embedding is not None:
            lookup += [(ids, embedding)]
        self.ids_lookup[first_id] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        if embedding is None:
            if name in self.word_embeddings:
                del self.word_embeddings[name]
            if len(self.ids_lookup[first_id]) == 0:
                del self.ids_lookup[first_id]
            return None
        self.word_embeddings[name] = embedding
        return embedding

    def find_embedding_at_position(self, tokens: list[int], offset: int) -> tuple[Embedding | None, int | None]:
        for ids, embedding in self.ids_lookup.get(tokens[offset], []):
            if tokens[offset : offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None


class A1111EmbeddingDatabase(_Database):
    """A1111: names tokenized by ``model.cond_stage_model.tokenize([name])[0]``."""

    def __init__(self) -> None:
        super().__init__()
        self.previously_displayed_embeddings = ()

    def register_embedding(self, embedding: Embedding, model: Any) -> Embedding | None:
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding: Embedding | None, model: Any, name: str) -> Embedding | None:
        return self._register(embedding, name, model.cond_stage_model.tokenize([name])[0])


class ForgeEmbeddingDatabase(_Database):
    """Forge: its own tokenizer (``tokenizer([name], truncation=False, add_special_tokens=False)``), and the
    ``fixes`` the text engine leaves for ``CLIPEmbeddingForTextualInversion``."""

    def __init__(self, expected_shape: int = -1) -> None:
        super().__init__(expected_shape)
        self.fixes: list | None = []

    def register_embedding(self, embedding: Embedding) -> Embedding | None:
        return self.register_embedding_by_name(embedding, embedding.name)

    def register_embedding_by_name(self, embedding: Embedding | None, name: str) -> Embedding | None:
        return self._register(embedding, name, word_ids([name])[0])


class EmbeddingsWithFixes(nn.Module):
    """A1111 ``sd_hijack.EmbeddingsWithFixes`` / Forge ``CLIPEmbeddingForTextualInversion``: the token embedding,
    with each fix's vectors (``vec[key]`` for an SDXL dict) spliced in after the start token. ``owner.fixes`` is
    read once and cleared (A1111 keeps it on ``model_hijack``, Forge on the database). (Forge's also aliases
    ``self.weight = wrapped.weight``; left out, so the stand-in's state dict names each weight once.)"""

    def __init__(self, wrapped: nn.Module, owner: Any, textual_inversion_key: str) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.owner = [owner]  # a list: not a submodule
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        owner = self.owner[0]
        batch_fixes, owner.fixes = owner.fixes, None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or max(len(x) for x in batch_fixes) == 0:
            return inputs_embeds
        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                vec = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                emb = vec.to(inputs_embeds)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0 : offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len :]]).to(dtype=inputs_embeds.dtype)
            vecs.append(tensor)
        return torch.stack(vecs)


def splice_embeddings(texts: list[str], db: _Database) -> tuple[list[str], list[list[tuple[int, Embedding]]]]:
    """What the prompt processing does before encoding (A1111 ``tokenize_line``, Forge ``ClassicTextProcessingEngine``):
    each text with every embedding found replaced by as many placeholder words as it has vectors, and the fixes
    (word offset, embedding) for the token embedding's wrapper."""
    rewritten, all_fixes = [], []
    for text in texts:
        words, ids = words_of(text), word_ids([text])[0]
        out: list[str] = []
        fixes: list[tuple[int, Embedding]] = []
        i = 0
        while i < len(words):
            embedding, length = db.find_embedding_at_position(ids, i)
            if embedding is None:
                out.append(words[i])
                i += 1
                continue
            fixes.append((len(out), embedding))
            out += [_PLACEHOLDER] * int(embedding.vectors)
            i += int(length or 1)
        rewritten.append(" ".join(out))
        all_fixes.append(fixes)
    return rewritten, all_fixes


def bundle_embedding(
    path: Any, name: str, vectors: int = 2, seed: int = 0, widths: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Add ``bundle_emb.<name>.clip_l`` / ``.clip_g`` ([vectors, width] each; the toy's widths unless given) to
    the LoRA file at ``path`` (metadata kept); returns them."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    g = torch.Generator().manual_seed(seed)
    l_width, g_width = widths or (TE1_CONFIG.width, TE2_CONFIG.width)
    added = {
        f"bundle_emb.{name}.clip_l": torch.randn(vectors, l_width, generator=g) * 2,
        f"bundle_emb.{name}.clip_g": torch.randn(vectors, g_width, generator=g) * 2,
    }
    save_file({**tensors, **added}, str(path), metadata=metadata)
    return added
