"""The source LoRAs' bundled embeddings registered with A1111's embedding database while a job encodes prompts,
and the database put back exactly as it was afterwards (also on failure or interrupt).

A1111's Lora extension does the same whenever a prompt loads such a LoRA (extensions-builtin/Lora/networks.py:
``load_network`` builds each ``bundle_emb`` with ``textual_inversion.create_embedding_from_data``,
``load_networks`` registers it with ``sd_hijack.model_hijack.embedding_db`` unless the embeddings folder has
one of that name, and skips one whose width does not fit). The session follows those rules, so the teachers see
the trigger the way the user's own renders do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ziplora.hosts.embeddings import BundledEmbedding, register_for_job, restored_afterwards

log = logging.getLogger(__name__)

__all__ = ["bundled_embeddings_registered"]


@contextmanager
def bundled_embeddings_registered(sd_model: Any, embeddings: tuple[BundledEmbedding, ...]) -> Iterator[list[str]]:
    """Yields the names registered for the job."""
    if not embeddings:
        yield []
        return
    from modules import sd_hijack
    from modules.textual_inversion import textual_inversion

    db = sd_hijack.model_hijack.embedding_db

    def create(item: BundledEmbedding) -> Any:
        return textual_inversion.create_embedding_from_data(item.data, item.name, filename=f"{item.source}/{item.name}")

    with restored_afterwards(db):
        # an embedding A1111's Lora extension registered carries ``loaded``; one from the embeddings folder does not
        names = register_for_job(db, embeddings, create, lambda e: db.register_embedding(e, sd_model), lambda e: not hasattr(e, "loaded"))
        if names:
            log.info("ZipLoRA: bundled embeddings registered for the job: %s", ", ".join(names))
        yield names
