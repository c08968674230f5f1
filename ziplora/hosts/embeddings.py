"""Bundled embeddings: the textual-inversion embeddings a LoRA file carries as ``bundle_emb.<name>.<key>`` (for
SDXL ``clip_l`` and ``clip_g``; pivotal-tuned subject LoRAs ship their trigger this way).

A job hands them to the host (``SessionOptions.embeddings``); A1111 and Forge register them with their embedding
database while the session encodes prompts, so a trigger reads as the learned vectors and not as plain text,
and put the database back exactly as it was afterwards (``restored_afterwards``). Both WebUIs' databases
(A1111 ``modules/textual_inversion/textual_inversion.py``, Forge ``backend/text_processing/textual_inversion.py``)
keep the same three tables: ``word_embeddings``, ``ids_lookup`` and ``skipped_embeddings``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ziplora.errors import HostError

if TYPE_CHECKING:
    from ziplora.formats.lorafile import LoraFile

log = logging.getLogger(__name__)

__all__ = ["BundledEmbedding", "bundled_embeddings", "restored_afterwards", "register_for_job"]

PREFIX = "bundle_emb."


@dataclass(frozen=True, eq=False)
class BundledEmbedding:
    """One bundled embedding: ``data`` as A1111's ``networks.load_network`` builds it from the file's keys
    (``{"clip_l": t, "clip_g": t}`` for SDXL; ``{"string_to_param": {"*": t}}`` for the older layout), ready
    for the WebUI's own ``create_embedding_from_data``."""

    name: str
    source: str  # the LoRA file it came from, for messages
    data: dict[str, Any] = field(default_factory=dict)


def bundled_embeddings(*loras: LoraFile) -> tuple[BundledEmbedding, ...]:
    """Every embedding the given files bundle, in file order; a name already taken by an earlier file is
    skipped (``check_merge_sources`` refuses two files bundling different vectors under one name)."""
    out: dict[str, BundledEmbedding] = {}
    for lora in loras:
        for name, keys in sorted(lora.embeddings.items()):
            if name in out:
                continue
            data: dict[str, Any] = {}
            for key in sorted(keys):
                part = key[len(PREFIX) + len(name) + 1 :]  # bundle_emb.<name>.<part>
                tensor = lora.st.read(key)
                if part.split(".")[0] == "string_to_param":  # networks.py load_network: string_to_param.<k2>
                    data["string_to_param"] = {part.split(".", 1)[1] if "." in part else "*": tensor}
                else:
                    data[part] = tensor
            out[name] = BundledEmbedding(name, lora.path.name, data)
    return tuple(out.values())


@contextmanager
def restored_afterwards(db: Any) -> Iterator[None]:
    """Whatever happens inside, ``db`` (an A1111 or Forge ``EmbeddingDatabase``) comes back exactly: the same
    dict and list objects holding the same entries in the same order, and every other attribute's value."""
    attributes = dict(vars(db))
    tables = {name: dict(value) for name, value in attributes.items() if isinstance(value, dict)}
    lookup = getattr(db, "ids_lookup", None)
    lists = {first: (entries, list(entries)) for first, entries in lookup.items()} if isinstance(lookup, dict) else {}
    try:
        yield
    finally:
        for name, value in attributes.items():
            setattr(db, name, value)
            if name in tables:
                value.clear()
                value.update(tables[name])
        for entries, items in lists.values():
            entries[:] = items  # register_embedding_by_name extends the list it finds in place
        for name in set(vars(db)) - set(attributes):
            delattr(db, name)


def register_for_job(
    db: Any,
    embeddings: tuple[BundledEmbedding, ...],
    create: Callable[[BundledEmbedding], Any],
    register: Callable[[Any], None],
    users_own: Callable[[Any], bool],
) -> list[str]:
    """Register each bundled embedding with ``db`` (inside ``restored_afterwards(db)``): built by the WebUI's own
    ``create_embedding_from_data`` (``create``), added by its ``register_embedding`` (``register``). As the WebUI
    does when it renders with the LoRA, a name the user's own embedding already has (``users_own``: from the
    embeddings folder) keeps the user's, and an embedding whose width does not fit the model is skipped (the
    trigger then reads as text, as in the user's own renders); both are logged. Returns the registered names."""
    registered = []
    for item in embeddings:
        existing = db.word_embeddings.get(item.name)
        if existing is not None and users_own(existing):
            log.warning("ZipLoRA: %s bundles the embedding %r, but one of that name is in the embeddings folder: the merge "
                        "encodes prompts with the folder's, as the WebUI renders them", item.source, item.name)  # fmt: skip
            continue
        try:
            embedding = create(item)
        except Exception as err:  # noqa: BLE001 - the WebUI's own reader; its failure is the file's reason
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            raise HostError(f"{item.source}: its bundled embedding {item.name!r} cannot be read ({reason})") from None
        expected = getattr(db, "expected_shape", -1)
        if expected not in (-1, embedding.shape):
            log.warning("ZipLoRA: %s bundles the embedding %r with vectors %s wide; this model's text encoders take %s: "
                        "it is not used, as in the WebUI's own renders (%s)", item.source, item.name, embedding.shape,
                        expected, _tensor_shapes(item))  # fmt: skip
            continue
        register(embedding)
        registered.append(item.name)
    return registered


def _tensor_shapes(embedding: BundledEmbedding) -> str:
    """``clip_l [2, 768], clip_g [2, 1280]``: the bundled tensors' shapes, for messages."""
    parts = []
    for key, value in embedding.data.items():
        tensors = value.items() if isinstance(value, dict) else [(key, value)]
        parts += [f"{k} {list(t.shape)}" for k, t in tensors if isinstance(t, torch.Tensor)]
    return ", ".join(parts)
