"""The source LoRAs' bundled embeddings registered with Forge's embedding databases while a job encodes prompts,
and the databases put back exactly as they were afterwards (also on failure or interrupt).

Forge 2 keeps one ``EmbeddingDatabase`` per text encoder (``backend/text_processing/classic_engine.py``
``ClassicTextProcessingEngine.embeddings``; SDXL's engine has ``text_processing_engine_l`` and ``_g``), filled
from the embeddings folder when the model loads. Unlike A1111, Forge's LoRA extension (``sd_forge_lora``) never
reads ``bundle_emb`` keys, so in the user's own renders a bundled trigger reads as text unless its embedding is
in the embeddings folder. The merge registers them anyway: the subject LoRA was trained with that trigger, and a
merged file is mostly used elsewhere (A1111 registers the carried embeddings). A name the folder already has
keeps the folder's, as Forge renders it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from ziplora.hosts.embeddings import BundledEmbedding, register_for_job, restored_afterwards
from ziplora.hosts.forge.engine import unsupported

log = logging.getLogger(__name__)

__all__ = ["bundled_embeddings_registered"]

_ENGINES = ("text_processing_engine_l", "text_processing_engine_g")  # backend/diffusion_engine/sdxl.py


@contextmanager
def bundled_embeddings_registered(sd_model: Any, embeddings: tuple[BundledEmbedding, ...]) -> Iterator[list[str]]:
    """Yields the names registered for the job (with both text encoders' databases)."""
    if not embeddings:
        yield []
        return
    try:
        textual_inversion = importlib.import_module("backend.text_processing.textual_inversion")
    except ImportError:
        raise unsupported("this WebUI has no backend.text_processing.textual_inversion for the LoRAs' bundled embeddings") from None
    databases: list[Any] = [getattr(getattr(sd_model, name, None), "embeddings", None) for name in _ENGINES]
    if any(db is None for db in databases):
        raise unsupported("the SDXL engine has no text_processing_engine_l / _g embedding databases")

    def create(item: BundledEmbedding) -> Any:  # one per database, as Forge loads the embeddings folder into each
        return textual_inversion.create_embedding_from_data(item.data, item.name, filename=f"{item.source}/{item.name}")

    with ExitStack() as stack:
        names: list[str] = []
        for db in databases:
            stack.enter_context(restored_afterwards(db))
            # Forge registers nothing but the embeddings folder's: any embedding already there is the user's own
            names = register_for_job(db, embeddings, create, db.register_embedding, lambda e: True)
        if names:
            log.info("ZipLoRA: bundled embeddings registered for the job: %s", ", ".join(names))
        yield names
