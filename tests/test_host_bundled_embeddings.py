"""Bundled embeddings (``bundle_emb.<name>.clip_l / clip_g`` in a LoRA file) while a merge encodes its prompts.

A pivotal-tuned subject LoRA's trigger is an embedding the file carries; read as plain text, the teacher renders
the wrong subject. The WebUI hosts register both sources' bundled embeddings with the WebUI's embedding
database for the session and put the database back exactly as it was afterwards, also after a failure: the
same table objects holding the same entries in the same order. Run against both stand-ins
(tests/standins/a1111.py, tests/standins/forge.py; their databases: tests/standins/textual_inversion.py).
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.standins import forge as forge_standin
from tests.standins.a1111 import build_world, installed
from tests.standins.textual_inversion import EXPECTED_SHAPE, bundle_embedding, create_embedding_from_data
from ziplora.errors import HostError
from ziplora.formats.families import Family
from ziplora.formats.lorafile import open_lora
from ziplora.hosts.base import SessionOptions
from ziplora.hosts.embeddings import bundled_embeddings, restored_afterwards
from ziplora.hosts.forge import ForgeHost
from ziplora.progress import Progress
from ziplora.request import MergeRequest
from ziplora.service import MergeService
from ziplora.synthetic import attention_layers, write_random_lora

TRIGGER = "sksdog"


def _write_loras(folder: Path) -> dict[str, torch.Tensor]:
    """subject (bundles TRIGGER), style, and the user's own LoRA bundling another TRIGGER; the subject's tensors."""
    keys = attention_layers(Family.TOYXL)
    write_random_lora(folder / "subject.safetensors", keys, Family.TOYXL, rank=4, seed=1, scale=0.3,
                      metadata={"modelspec.trigger_phrase": TRIGGER})  # fmt: skip
    write_random_lora(folder / "style.safetensors", keys, Family.TOYXL, rank=4, seed=2, scale=0.3,
                      metadata={"modelspec.trigger_phrase": "zwx style"})  # fmt: skip
    write_random_lora(folder / "user.safetensors", keys, Family.TOYXL, rank=2, seed=3, scale=0.5)
    bundle_embedding(folder / "user.safetensors", TRIGGER, seed=11)
    return bundle_embedding(folder / "subject.safetensors", TRIGGER, seed=10)


@pytest.fixture(scope="module")
def base_toy():  # type: ignore[no-untyped-def]
    from ziplora.toy.pipeline import untrained_toy

    return untrained_toy(seed=0)


@pytest.fixture()
def a1111(tmp_path: Path, base_toy):  # type: ignore[no-untyped-def]
    folder = tmp_path / "Lora"
    folder.mkdir()
    tensors = _write_loras(folder)
    world = build_world(copy.deepcopy(base_toy), folder)
    with installed(world):
        yield world, tensors


@pytest.fixture()
def forge(tmp_path: Path):  # type: ignore[no-untyped-def]
    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    tensors = _write_loras(folder)
    world = forge_standin.install(folder)
    try:
        world.generate("a shape")  # Forge loads its model at the first generation
        yield world, tensors
    finally:
        forge_standin.uninstall()


def _a1111_host():  # type: ignore[no-untyped-def]
    from tests.test_host_a1111 import ToyA1111Host

    return ToyA1111Host()


def _forge_host() -> ForgeHost:
    return ForgeHost(families=(Family.TOYXL,), default_resolution=32, preview_steps=3)


def _a1111_dbs(world: Any) -> list[Any]:
    return [world.sd_hijack.model_hijack.embedding_db]


def _forge_dbs(world: Any) -> list[Any]:
    sd = world.sd_model
    return [sd.text_processing_engine_l.embeddings, sd.text_processing_engine_g.embeddings]


def snapshot(db: Any) -> tuple[tuple, list]:
    """(what "exactly as it was" compares: table identities, entries by identity and order; the objects, kept alive)."""
    keep = [db.word_embeddings, db.ids_lookup, db.skipped_embeddings, *db.word_embeddings.values(), *db.ids_lookup.values()]
    ids = (
        sorted(vars(db)),
        id(db.word_embeddings), [(k, id(v)) for k, v in db.word_embeddings.items()],
        id(db.ids_lookup), [(k, id(v), [(tuple(i), id(e)) for i, e in v]) for k, v in db.ids_lookup.items()],
        id(db.skipped_embeddings), [(k, id(v)) for k, v in db.skipped_embeddings.items()],
        id(getattr(db, "fixes", None)), db.expected_shape,
    )  # fmt: skip
    return ids, keep


def _is_subjects(embedding: Any, tensors: dict[str, torch.Tensor]) -> bool:
    return embedding is not None and all(
        torch.equal(embedding.vec[key].cpu(), tensors[f"bundle_emb.{TRIGGER}.{key}"].float()) for key in ("clip_l", "clip_g")
    )


def _folder_embedding(seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    data = {"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 64, generator=g)}
    return create_embedding_from_data(data, TRIGGER, filename=f"{TRIGGER}.safetensors", filepath=f"embeddings/{TRIGGER}.safetensors")


# -- reading them from the files; putting a database back -----------------------------------------------------


def test_bundled_embeddings_are_read_as_a1111s_lora_loader_reads_them(tmp_path: Path, toy_keys) -> None:  # type: ignore[no-untyped-def]
    a = write_random_lora(tmp_path / "a.safetensors", toy_keys, Family.TOYXL, rank=2, seed=1)
    b = write_random_lora(tmp_path / "b.safetensors", toy_keys, Family.TOYXL, rank=2, seed=2)
    ta = bundle_embedding(a, "first", vectors=3, seed=1)
    bundle_embedding(a, "shared", seed=2)
    bundle_embedding(b, "shared", seed=2)
    from safetensors.torch import load_file, save_file

    tb = {**load_file(str(b)), "bundle_emb.old.string_to_param.*": torch.ones(2, 96)}
    save_file(tb, str(b))
    found = bundled_embeddings(open_lora(a), open_lora(b))
    assert [(e.name, e.source) for e in found] == [("first", "a.safetensors"), ("shared", "a.safetensors"), ("old", "b.safetensors")]
    assert set(found[0].data) == {"clip_l", "clip_g"} and torch.equal(found[0].data["clip_l"], ta["bundle_emb.first.clip_l"])
    assert list(found[2].data) == ["string_to_param"] and list(found[2].data["string_to_param"]) == ["*"]


def test_restored_afterwards_puts_back_tables_entries_order_and_attributes() -> None:
    from tests.standins.textual_inversion import ForgeEmbeddingDatabase

    db = ForgeEmbeddingDatabase(EXPECTED_SHAPE)
    for name in ("alpha", "beta"):
        db.register_embedding(create_embedding_from_data({"clip_l": torch.ones(1, 32), "clip_g": torch.ones(1, 64)}, name))
    before, _keep = snapshot(db)
    for fail in (False, True):
        with pytest.raises(RuntimeError) if fail else torch.no_grad():
            with restored_afterwards(db):
                db.register_embedding(create_embedding_from_data({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 64)}, "alpha"))
                db.register_embedding(create_embedding_from_data({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 64)}, "gamma"))
                db.skipped_embeddings["wide"] = object()  # type: ignore[assignment]
                db.fixes, db.extra = None, 1  # type: ignore[attr-defined]
                if fail:
                    raise RuntimeError("boom")
        assert snapshot(db)[0] == before and not hasattr(db, "extra")


# -- A1111 -----------------------------------------------------------------------------------------------------


def test_a1111_session_reads_the_trigger_as_the_subjects_embedding_and_puts_the_database_back(a1111) -> None:  # type: ignore[no-untyped-def]
    world, tensors = a1111
    db = _a1111_dbs(world)[0]
    world.networks.load_networks(["user"], [1.0], [1.0], None)  # a generation with the user's LoRA left its own TRIGGER
    assert db.word_embeddings[TRIGGER].loaded is True and not _is_subjects(db.word_embeddings[TRIGGER], tensors)
    batch = world.prompt_parser.SdConditioning([f"a {TRIGGER} shape"], width=32, height=32)
    users = world.sd_model.get_learned_conditioning(batch)["crossattn"]
    before, _keep = snapshot(db)
    content = open_lora(world.lora_dir / "subject.safetensors")
    with _a1111_host().session(SessionOptions(embeddings=bundled_embeddings(content)), Progress()) as session:
        assert _is_subjects(db.word_embeddings[TRIGGER], tensors)
        trigger = session.encode([f"a {TRIGGER} shape"])["crossattn"]
        plain = session.encode(["a qqqq shape"])["crossattn"]  # another word the model does not know
        assert not torch.equal(trigger, plain) and not torch.equal(trigger, users)
    assert snapshot(db)[0] == before
    assert torch.equal(world.sd_model.get_learned_conditioning(batch)["crossattn"], users)


def test_a1111_embeddings_folder_keeps_its_name_and_a_width_that_does_not_fit_is_skipped(a1111, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    world, tensors = a1111
    db = _a1111_dbs(world)[0]
    folder = _folder_embedding(5)
    db.register_embedding(folder, world.sd_model)
    wide = write_random_lora(tmp_path / "wide.safetensors", attention_layers(Family.TOYXL), Family.TOYXL, rank=2, seed=4)
    bundle_embedding(wide, "narrow", widths=(16, 16))
    before, _keep = snapshot(db)
    found = bundled_embeddings(open_lora(world.lora_dir / "subject.safetensors"), open_lora(wide))
    with caplog.at_level(logging.WARNING), _a1111_host().session(SessionOptions(embeddings=found), Progress()):
        assert db.word_embeddings[TRIGGER] is folder and "narrow" not in db.word_embeddings
    assert "embeddings folder" in caplog.text and "'narrow'" in caplog.text
    assert snapshot(db)[0] == before


def test_a1111_merge_encodes_with_the_bundled_trigger_and_leaves_the_database_as_it_was(a1111) -> None:  # type: ignore[no-untyped-def]
    world, tensors = a1111
    db = _a1111_dbs(world)[0]
    world.networks.load_networks(["user"], [1.0], [1.0], None)
    _merge_registers_and_restores(world, _a1111_host(), [db], tensors)


def test_a1111_malformed_bundle_is_one_line_and_changes_nothing(a1111, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    world, _ = a1111
    from safetensors.torch import load_file, save_file

    path = world.lora_dir / "subject.safetensors"  # an embedding neither SDXL's layout nor one tensor
    save_file(
        {**load_file(str(path)), "bundle_emb.broken.clip_l": torch.ones(2, 32), "bundle_emb.broken.extra": torch.ones(2, 8)}, str(path)
    )
    db = _a1111_dbs(world)[0]
    before, _keep = snapshot(db)
    flags = [p.requires_grad for p in world.sd_model.parameters()]
    with pytest.raises(HostError) as err:
        with _a1111_host().session(SessionOptions(embeddings=bundled_embeddings(open_lora(path))), Progress()):
            pass
    assert "subject.safetensors" in str(err.value) and "'broken'" in str(err.value) and "\n" not in str(err.value)
    assert snapshot(db)[0] == before and [p.requires_grad for p in world.sd_model.parameters()] == flags
    assert not world.call_queue.queue_lock.locked()


# -- Forge -----------------------------------------------------------------------------------------------------


def test_forge_session_registers_the_trigger_with_both_encoders_and_puts_them_back(forge) -> None:  # type: ignore[no-untyped-def]
    world, tensors = forge
    dbs = _forge_dbs(world)
    before = [snapshot(db) for db in dbs]
    content = open_lora(world.lora_dir / "subject.safetensors")
    with _forge_host().session(SessionOptions(embeddings=bundled_embeddings(content)), Progress()) as session:
        assert all(_is_subjects(db.word_embeddings[TRIGGER], tensors) for db in dbs)
        trigger = session.encode([f"a {TRIGGER} shape"])["crossattn"]
        plain = session.encode(["a qqqq shape"])["crossattn"]
        assert not torch.equal(trigger[..., :32], plain[..., :32]) and not torch.equal(trigger[..., 32:], plain[..., 32:])
    assert [snapshot(db)[0] for db in dbs] == [b[0] for b in before]
    assert TRIGGER not in dbs[0].word_embeddings


def test_forge_embeddings_folder_keeps_its_name(forge) -> None:  # type: ignore[no-untyped-def]
    world, tensors = forge
    dbs = _forge_dbs(world)
    folder = [_folder_embedding(5), _folder_embedding(5)]  # Forge loads the folder into each database
    for db, embedding in zip(dbs, folder):
        db.register_embedding(embedding)
    before = [snapshot(db) for db in dbs]
    content = open_lora(world.lora_dir / "subject.safetensors")
    with _forge_host().session(SessionOptions(embeddings=bundled_embeddings(content)), Progress()):
        assert [db.word_embeddings[TRIGGER] for db in dbs] == folder
    assert [snapshot(db)[0] for db in dbs] == [b[0] for b in before]


def test_forge_merge_encodes_with_the_bundled_trigger_and_leaves_the_databases_as_they_were(forge) -> None:  # type: ignore[no-untyped-def]
    world, tensors = forge
    _merge_registers_and_restores(world, _forge_host(), _forge_dbs(world), tensors)


# -- the whole job ---------------------------------------------------------------------------------------------


def _merge_registers_and_restores(world: Any, host: Any, dbs: list[Any], tensors: dict[str, torch.Tensor]) -> None:
    """A merge through the service: while it optimises, every database holds the subject's TRIGGER; after it, and
    after a merge that fails mid-way, each is exactly as before. The written file carries the embedding."""
    before = [snapshot(db) for db in dbs]
    for output, fail in (("zipped", False), ("failed", True)):
        seen: dict[str, bool] = {}
        progress = Progress()

        def listen(p: Progress, fail: bool = fail, seen: dict[str, bool] = seen) -> None:
            if p.stage.startswith("Optimising") and p.done == 1 and not seen:
                seen["subject's"] = all(_is_subjects(db.word_embeddings.get(TRIGGER), tensors) for db in dbs)
                if fail:
                    raise RuntimeError("boom")

        progress.add_listener(listen)
        request = MergeRequest(content="subject", style="style", output_name=output, steps=3, sampling_steps=2, samples=1,
                               content_prompt=f"a {TRIGGER} shape", style_prompt="a shape in zwx style")  # fmt: skip
        service = MergeService(host)
        status = service.wait(service.submit_merge(request, progress), 300)
        assert status.state == ("failed" if fail else "done"), status.error
        assert seen == {"subject's": True}
        assert [snapshot(db)[0] for db in dbs] == [b[0] for b in before]
    written = open_lora(world.lora_dir / "zipped.safetensors")
    assert list(written.embeddings) == [TRIGGER]
    assert "modules" in sys.modules  # the stand-in stayed installed throughout
