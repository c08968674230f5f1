"""Patching, the loss and the optimisation loop on an untrained ToyXL (the test host)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import state_hash
from ziplora.errors import HostError, JobInterrupted
from ziplora.formats import Family, LayerKey, open_lora
from ziplora.hosts.base import SessionOptions
from ziplora.inputs import InputOptions, data_free_inputs
from ziplora.jobs import load_factors, run_merge
from ziplora.merge import ZipLayer, ZipOptions, build_parts, optimize_mergers, patch_layers
from ziplora.merge.checkpointing import checkpointed
from ziplora.merge.loss import layer_similarity, reconstruction
from ziplora.progress import Progress
from ziplora.request import MergeRequest


def _factors(lora_dir: Path):  # type: ignore[no-untyped-def]
    c = open_lora(lora_dir / "subject.safetensors", expect=Family.TOYXL)
    s = open_lora(lora_dir / "style.safetensors", expect=Family.TOYXL)
    return load_factors(c, s, Progress())


def _inputs(session, patches, steps=4, samples=1):  # type: ignore[no-untyped-def]
    return data_free_inputs(session, patches, "a sks shape", "a shape in zwx style", InputOptions(32, 32, samples, steps, 4.0), Progress())


@pytest.mark.parametrize("form", ["fused", "side"])
def test_patch_restores_the_model_bit_for_bit_even_after_an_error(toy_host, lora_dir: Path, form: str) -> None:
    factors = _factors(lora_dir)
    before = state_hash(toy_host.model)
    modules_before = {n: id(m) for n, m in toy_host.model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"):
        with toy_host.session(SessionOptions(), Progress()) as session:
            parts, mergers = build_parts(factors, session.device, session.dtype)
            with patch_layers(session.resolve, parts, session.device, form) as patches:
                assert all(isinstance(session.resolve(k)[0]._modules[session.resolve(k)[1]], ZipLayer) for k in parts)
                assert patches.form_counts() == {form: len(parts)}
                x = torch.randn(2, 12, 16, 16)
                out = session.predict(x, torch.tensor([10, 500]), session.encode(["a", "b"]))
                out.sum().backward()
                raise RuntimeError("boom")
    assert state_hash(toy_host.model) == before
    assert {n: id(m) for n, m in toy_host.model.named_modules()} == modules_before


def test_fused_and_side_forms_agree_and_modes_switch(toy_host, lora_dir: Path) -> None:
    factors = _factors(lora_dir)
    x = torch.randn(2, 12, 16, 16)
    t = torch.tensor([100, 700])
    outs = {}
    with toy_host.session(SessionOptions(), Progress()) as session:
        cond = session.encode(["a sks shape", "a shape in zwx style"])
        base = session.predict(x, t, cond)
        for form in ("fused", "side"):
            parts, bank = build_parts(factors, session.device, session.dtype)
            with torch.no_grad():
                bank.m_c.mul_(0.5)
            with patch_layers(session.resolve, parts, session.device, form) as patches:
                for mode in ("merged", "content", "style", "base"):
                    patches.set_mode(mode)
                    outs[(form, mode)] = session.predict(x, t, cond).detach()
    for mode in ("merged", "content", "style"):
        torch.testing.assert_close(outs[("fused", mode)], outs[("side", mode)], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(outs[("fused", mode)], base, atol=1e-3)
    torch.testing.assert_close(outs[("fused", "base")], base)
    assert not torch.allclose(outs[("fused", "merged")], outs[("fused", "content")], atol=1e-3)


def test_optimiser_lowers_the_loss_and_moves_the_mergers(toy_host, lora_dir: Path) -> None:
    factors = _factors(lora_dir)
    with toy_host.session(SessionOptions(), Progress()) as session:
        parts, bank = build_parts(factors, session.device, session.dtype)
        with patch_layers(session.resolve, parts, session.device, "fused") as patches:
            inputs = _inputs(session, patches)

            # the loss on every training state, at the start and at the end
            def full_loss() -> float:
                with torch.no_grad():
                    patches.set_mode("merged")
                    total = 0.0
                    for concept in (inputs.content, inputs.style):
                        idx = torch.arange(len(concept))
                        x, t, y, c = concept.batch(idx)
                        total += float(reconstruction(session.predict(x, t, c), y))
                    return total

            start = full_loss()
            result = optimize_mergers(session.predict, patches, bank, inputs, ZipOptions(steps=60, stop_similarity=0.0), Progress())
            end = full_loss()
    assert result.steps_run == 60
    assert end < 0.8 * start, (start, end)
    assert result.final_similarity < result.initial_similarity
    assert result.initial_similarity == pytest.approx(1.0)
    assert result.movement.mean_abs_change > 0.02
    assert len(result.history) == 60 and result.history[-1].step == 60
    assert set(result.cos_before) == set(result.cos_after) == {k for k, (c, s) in factors.items() if c is not None and s is not None}
    # the per-layer overlap of the two deltas (Fig. 3): checked against dense matrices for one layer
    key = next(iter(result.overlap_before))
    fc, fs = factors[key]
    dc, ds = fc.dense().flatten(), fs.dense().flatten()
    assert result.overlap_before[key] == pytest.approx(float(abs(dc @ ds) / (dc.norm() * ds.norm())), rel=1e-4)
    mc, ms = result.mergers[key]
    dcm, dsm = (fc.dense() * mc).flatten(), (fs.dense() * ms).flatten()
    assert result.overlap_after[key] == pytest.approx(float(abs(dcm @ dsm) / (dcm.norm() * dsm.norm())), rel=1e-3)


def test_the_bank_computes_what_the_per_layer_definition_says() -> None:
    from ziplora.merge import MergerBank

    widths = {LayerKey("unet", f"l{i}"): w for i, w in enumerate((3, 5, 8))}
    bank = MergerBank(widths, torch.device("cpu"))
    with torch.no_grad():
        bank.m_c.copy_(torch.randn(bank.total))
        bank.m_s.copy_(torch.randn(bank.total))
    pairs = [(v[0](), v[1]()) for v in (bank.views(k) for k in widths)]
    for kind in ("dot", "cos"):
        expected = sum(float(layer_similarity(c.detach(), s.detach(), kind)) for c, s in pairs)
        assert float(bank.similarity(kind)) == pytest.approx(expected, rel=1e-5)
    assert bank.layer_cos().tolist() == pytest.approx([float(layer_similarity(c, s, "cos")) for c, s in pairs], rel=1e-5)
    saved = bank.to_dict()
    assert torch.equal(saved[LayerKey("unet", "l1")][0], bank.m_c.detach()[3:8])


def test_the_public_implementations_learning_rate_leaves_the_mergers_at_one(toy_host, lora_dir: Path) -> None:
    factors = _factors(lora_dir)
    with toy_host.session(SessionOptions(), Progress()) as session:
        parts, bank = build_parts(factors, session.device, session.dtype)
        with patch_layers(session.resolve, parts, session.device) as patches:
            inputs = _inputs(session, patches)
            result = optimize_mergers(
                session.predict, patches, bank, inputs, ZipOptions(steps=100, lr=5e-5, stop_similarity=0.0), Progress()
            )
    deviation = max(float((m - 1).abs().max()) for pair in result.mergers.values() for m in pair)
    assert deviation <= 0.01  # 100 Adam steps of 5e-5: a plain sum, as mkshing/ziplora-pytorch produces
    assert deviation > 0


def test_gradient_checkpointing_gives_the_same_gradients(toy_host, lora_dir: Path) -> None:
    factors = _factors(lora_dir)
    grads = []
    with toy_host.session(SessionOptions(), Progress()) as session:
        x = torch.randn(2, 12, 16, 16)
        t = torch.tensor([10, 900])
        cond = session.encode(["a", "b"])
        for enabled in (False, True):
            parts, bank = build_parts(factors, session.device, session.dtype)
            with patch_layers(session.resolve, parts, session.device) as patches, checkpointed(session.checkpoint_blocks(), enabled) as n:
                assert n == (len(session.checkpoint_blocks()) if enabled else 0)
                patches.set_mode("merged")
                session.predict(x, t, cond).square().sum().backward()
                grads.append(torch.cat([bank.m_c.grad, bank.m_s.grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    assert all("forward" not in b.__dict__ for b in session.checkpoint_blocks())


def test_similarity_terms() -> None:
    ones = torch.ones(8)
    assert float(layer_similarity(ones, ones, "cos")) == pytest.approx(1.0)
    assert float(layer_similarity(ones, ones, "dot")) == pytest.approx(8.0)
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    assert float(layer_similarity(a, b, "cos")) == 0.0 and float(layer_similarity(a, b, "dot")) == 0.0


def test_interrupt_during_optimisation_leaves_nothing(toy_host, lora_dir: Path) -> None:
    class StopAt(Progress):
        def interrupted(self) -> bool:
            return self.stage.startswith("Optimising") and self.done >= 3

    before = state_hash(toy_host.model)
    files = sorted(p.name for p in lora_dir.iterdir())
    with pytest.raises(JobInterrupted):
        run_merge(MergeRequest("subject", "style", "zipped", steps=20, sampling_steps=3, samples=1), toy_host, StopAt())
    assert sorted(p.name for p in lora_dir.iterdir()) == files
    assert state_hash(toy_host.model) == before


def test_a_lora_for_another_model_fails_before_any_work(toy_host, lora_dir: Path) -> None:
    from ziplora.synthetic import write_random_lora

    write_random_lora(lora_dir / "sdxl.safetensors", [LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")])
    from ziplora.errors import WrongBaseModelError

    with pytest.raises(WrongBaseModelError, match="for SDXL, not ToyXL"):
        run_merge(MergeRequest("sdxl", "style", "x"), toy_host, Progress())


def test_patching_a_layer_of_the_wrong_size_is_a_host_error(toy_host, lora_dir: Path) -> None:
    from ziplora.formats.factors import Factors

    key = LayerKey("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    with toy_host.session(SessionOptions(), Progress()) as session:
        parts, _ = build_parts({key: (Factors(torch.zeros(640, 2), torch.zeros(2, 640)), None)}, session.device, session.dtype)
        with pytest.raises(HostError, match="another model"):
            with patch_layers(session.resolve, parts, session.device):
                pass


def test_a_failed_step_capture_falls_back_to_eager_and_says_so(toy_host, lora_dir: Path, monkeypatch) -> None:
    """On CUDA the step is captured in a graph; if capture fails the job goes on eagerly (simulated here)."""
    import contextlib

    import ziplora.merge.optimize as opt_mod

    class FakeStream:
        def wait_stream(self, other: object) -> None:
            pass

    class BrokenGraph:
        def __init__(self) -> None:
            raise RuntimeError("capture not supported here")

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", BrokenGraph)
    original_init = opt_mod._Step.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        self.want_graph = True  # as on a GPU

    monkeypatch.setattr(opt_mod._Step, "__init__", init)
    factors = _factors(lora_dir)
    with toy_host.session(SessionOptions(), Progress()) as session:
        parts, bank = build_parts(factors, session.device, session.dtype)
        with patch_layers(session.resolve, parts, session.device) as patches:
            inputs = _inputs(session, patches)
            result = optimize_mergers(session.predict, patches, bank, inputs, ZipOptions(steps=8, stop_similarity=0.0), Progress())
    assert result.steps_run == 8
    assert result.step_mode == "eager (capture failed: RuntimeError)"
    assert result.movement.mean_abs_change > 0


def test_auto_form_takes_the_side_path_when_fused_copies_would_not_fit(toy_host, lora_dir: Path, monkeypatch) -> None:
    import ziplora.jobs as jobs

    monkeypatch.setattr(jobs, "available_memory", lambda device: 10_000)  # bytes: far too little for the copies
    outcome = run_merge(MergeRequest("subject", "style", "side", steps=2, sampling_steps=2, samples=1), toy_host, Progress())
    assert outcome.zip is not None and outcome.zip.forms == {"side": 132}
    assert any("used the side path" in note for note in outcome.notes)
    monkeypatch.setattr(jobs, "available_memory", lambda device: 2**40)
    outcome = run_merge(MergeRequest("subject", "style", "fused", steps=2, sampling_steps=2, samples=1), toy_host, Progress())
    assert outcome.zip is not None and outcome.zip.forms == {"fused": 132} and not outcome.notes


@pytest.mark.parametrize("form", ["fused", "side"])
def test_a_bias_delta_is_added_by_the_teachers_and_the_student(form: str) -> None:
    """A full layer's diff_b renders in every mode that includes its source, whatever the mergers (they scale inputs)."""
    from ziplora.formats.factors import Factors

    torch.manual_seed(0)
    parent = torch.nn.Sequential(torch.nn.Linear(6, 4))
    key = LayerKey("unet", "0")
    f = Factors(torch.randn(4, 2), torch.randn(2, 6), None, torch.randn(4))
    parts, bank = build_parts({key: (f, Factors(torch.randn(4, 2), torch.randn(2, 6)))}, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        bank.m_c.mul_(0.5)
    x = torch.randn(3, 6)
    base = parent(x).detach()
    with patch_layers(lambda k: (parent, "0"), parts, torch.device("cpu"), form) as patches:
        outs = {}
        for mode in ("content", "merged", "base"):
            patches.set_mode(mode)
            outs[mode] = parent(x).detach()
    torch.testing.assert_close(outs["content"], base + x @ f.dense().T + f.bias, rtol=1e-5, atol=1e-5)
    m_c = torch.full((6,), 0.5)
    style = parts[key][1]
    merged = base + x @ (f.dense() * m_c).T + f.bias + x @ (style.up @ style.down).T
    torch.testing.assert_close(outs["merged"], merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["base"], base)
