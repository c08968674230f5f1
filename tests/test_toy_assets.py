"""The bundled toy assets: they load, stay small, and the base model draws what the scorers recognise."""

from __future__ import annotations

import json

from ziplora.formats import Family, open_lora
from ziplora.toy import world
from ziplora.toy.assets import ASSETS, LORA_DIR, bundled_lora_files, load_base_model, load_scorers, manifest
from ziplora.toy.catalog import ALL_LORAS
from ziplora.toy.scorers import evaluate_scorer


def test_assets_are_bundled_small_and_described() -> None:
    files = [p for p in ASSETS.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")]
    total = sum(p.stat().st_size for p in files)
    assert total <= 25 * 2**20, total
    data = manifest()
    assert data["scorer_accuracy"]["subject_heldout"] >= 0.95 and data["scorer_accuracy"]["style_heldout"] >= 0.95
    assert {p.stem for p in bundled_lora_files()} == {lora.name for lora in ALL_LORAS}


def test_every_bundled_lora_reads_as_a_toyxl_lora_with_its_trigger() -> None:
    for spec in ALL_LORAS:
        lora = open_lora(LORA_DIR / f"{spec.name}.safetensors", expect=Family.TOYXL)
        assert lora.trigger_words == [spec.trigger]
        summary = lora.summary()
        assert summary.unet_layers == 132
        assert summary.te1_layers + summary.te2_layers == (36 if spec.kind == "subject" else 0)
        assert json.loads((LORA_DIR / f"{spec.name}.json").read_text())["activation text"] == spec.trigger


def test_scorers_are_right_on_fresh_drawings() -> None:
    scorers = load_scorers()
    assert evaluate_scorer(scorers.subject, "subject", 300, seed=99) >= 0.95
    assert evaluate_scorer(scorers.style, "style", 300, seed=99) >= 0.95


def test_the_base_models_own_samples_are_recognised() -> None:
    """A sample of the measurement in manifest.json ("base_model_recognised"): the base model drawing every
    base subject in two styles, judged by the scorers. The full figure (4 samples of every one of the 48
    pairs) is measured by the build; here 16 images must clear a bar well under it."""
    model = load_base_model()
    scorers = load_scorers()
    subjects = list(world.BASE_SUBJECTS) * 2
    styles = [world.BASE_STYLE_NAMES[i % len(world.BASE_STYLE_NAMES)] for i in range(len(subjects))]
    images = model.generate([f"a {s} in {t} style" for s, t in zip(subjects, styles)], seed=4242)
    subj_ok = [scorers.subject.classes[i] == s for i, s in zip(scorers.subject.probabilities(images).argmax(-1).tolist(), subjects)]
    style_ok = [scorers.style.classes[i] == t for i, t in zip(scorers.style.probabilities(images).argmax(-1).tolist(), styles)]
    measured = manifest()["base_model_recognised"]
    assert sum(subj_ok) / len(subjects) >= min(0.75, measured["subject_right"] - 0.2)
    assert sum(style_ok) / len(styles) >= min(0.6, measured["style_right"] - 0.25)
