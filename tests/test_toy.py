"""The toy world: SDXL's layout and names, the procedural world, and the model's pieces."""

from __future__ import annotations

import torch

from ziplora.architecture.sgm_unet import UNetConfig, UNetModel
from ziplora.formats import Family, LayerKey, reference_shapes
from ziplora.synthetic import attention_layers
from ziplora.toy import world
from ziplora.toy.pipeline import ToyXL
from ziplora.toy.text import RARE_TOKENS, Tokenizer


def test_sdxl_base_configuration_has_sdxls_module_tree() -> None:
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.sdxl_base())
    names = {n for n, _ in unet.named_modules()}
    blocks = [n for n in names if n.endswith(".attn1") and "transformer_blocks" in n]
    assert len(blocks) == 70  # SDXL: 70 BasicTransformerBlocks in 11 SpatialTransformers
    assert len(attention_layers(Family.SDXL)) == 722  # kohya's default SDXL targets
    assert len(attention_layers(Family.SDXL, kohya_default=False)) == 560  # the paper's 1.6 M mergers
    widths = sum(reference_shapes(Family.SDXL)[k][1] for k in attention_layers(Family.SDXL, kohya_default=False))
    assert widths == 785_920
    for path in ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "middle_block.1.transformer_blocks.9.ff.net.2",
                 "output_blocks.2.2.conv", "output_blocks.5.2.conv", "input_blocks.7.0.skip_connection", "label_emb.0.0"):  # fmt: skip
        assert path in names, path
    shapes = reference_shapes(Family.SDXL)
    assert shapes[LayerKey("unet", "output_blocks.0.1.transformer_blocks.3.attn2.to_k")] == (1280, 2048)
    assert shapes[LayerKey("unet", "input_blocks.4.1.transformer_blocks.1.ff.net.0.proj")] == (5120, 640)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL-base UNet's parameter count


def test_toy_model_uses_the_same_names_and_cross_attention_context() -> None:
    model = ToyXL()
    unet_names = {n for n, _ in model.unet.named_modules()}
    sdxl = {k.path for k in reference_shapes(Family.SDXL) if k.component == "unet"}
    toy_layers = {n for n, m in model.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert toy_layers <= sdxl  # every toy layer has an SDXL twin of the same name
    assert "input_blocks.4.1.transformer_blocks.0.attn2.to_k" in unet_names
    te_names = {n for n, _ in model.te2.named_modules()}
    assert {"text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.2.mlp.fc2", "text_projection"} <= te_names
    cond = model.encode(["a circle in crimson style", ""])
    assert cond["crossattn"].shape == (2, 16, 96) and cond["vector"].shape == (2, 112)
    x = torch.randn(2, *model.latent_shape)
    assert model.predict(x, torch.tensor([1, 999]), cond).shape == x.shape
    assert len(attention_layers(Family.TOYXL)) == 132


def test_schedule_is_sdxls_scaled_linear() -> None:
    a = ToyXL().schedule.alphas_cumprod
    assert a.shape == (1000,)
    assert abs(float(a[0]) - (1 - 0.00085)) < 1e-7
    assert abs(float(a[-1]) - 0.00466) < 1e-4


def test_world_is_seeded_and_covers_every_class() -> None:
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    subj, sty = list(world.ALL_SUBJECTS), [world.ALL_STYLE_NAMES[i % 9] for i in range(len(world.ALL_SUBJECTS))]
    a, b = world.render(subj, sty, g1), world.render(subj, sty, g2)
    assert torch.equal(a, b) and a.shape == (11, 3, 32, 32)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert len(world.BASE_SUBJECTS) >= 8 and len(world.BASE_STYLES) >= 6 and len(world.NOVEL_SUBJECTS) >= 3 and len(world.NOVEL_STYLES) >= 3
    # the toy VAE is exact
    model = ToyXL()
    assert torch.allclose(model.decode_latents(model.encode_images(a)), a, atol=1e-6)


def test_tokenizer_strips_lora_tags_and_knows_the_rare_tokens() -> None:
    tok = Tokenizer(16)
    ids, eos = tok(["<lora:zipped:1> a SKS shape, in zwx style!", ""])
    assert ids.shape == (2, 16) and eos.tolist() == [7, 1]
    assert all(tok.known(w) for w in RARE_TOKENS)
    assert ids[0, 2] == tok.ids["sks"]
