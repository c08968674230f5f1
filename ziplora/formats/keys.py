"""Key names <-> module paths.

Canonical layer keys are (component, module path): ``unet`` paths use sgm names (the original SDXL layout
that A1111 and Forge expose, e.g. ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``); ``te1`` / ``te2``
paths use Hugging Face CLIP names (``text_model.encoder.layers.0.self_attn.q_proj``).
Files name layers in kohya form (``lora_unet_input_blocks_4_1_..._to_q``), kohya-diffusers form
(``lora_unet_down_blocks_1_attentions_0_...``) or diffusers / PEFT dotted form
(``unet.down_blocks.1.attentions.0...to_q.lora_A.weight``); this module turns each into a canonical key and
a canonical suffix, and writes kohya names back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ziplora.architecture.sdxl_base import sdxl_base_shapes

__all__ = [
    "LayerKey",
    "COMPONENTS",
    "KOHYA_PREFIXES",
    "ParsedKey",
    "parse_tensor_key",
    "kohya_name",
    "underscored_to_path",
    "diffusers_unet_to_sgm",
    "sgm_unet_to_diffusers",
    "sdxl_unet_module_paths",
]

COMPONENTS = ("unet", "te1", "te2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}


@dataclass(frozen=True, order=True)
class LayerKey:
    """One targeted module: which network, and the module's dotted path inside it."""

    component: str
    path: str

    def __str__(self) -> str:
        return f"{self.component}:{self.path}"

    @property
    def kohya(self) -> str:
        return kohya_name(self)


def kohya_name(key: LayerKey) -> str:
    return KOHYA_PREFIXES[key.component] + key.path.replace(".", "_")


# Words that contain an underscore inside one module name; everything else splits at "_".
_COMPOUNDS = (
    # sgm UNet
    "input_blocks", "middle_block", "output_blocks", "transformer_blocks", "proj_in", "proj_out",
    "to_q", "to_k", "to_v", "to_out", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb",
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut",
    "time_emb_proj", "time_embedding", "add_embedding", "linear_1", "linear_2",
    # CLIP
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
    "final_layer_norm", "token_embedding", "position_embedding", "text_projection",
)  # fmt: skip
_TOKEN = re.compile("(?:" + "|".join(sorted(_COMPOUNDS, key=len, reverse=True)) + r"|[^_]+)(?=_|$)")


def underscored_to_path(name: str) -> str:
    """``input_blocks_4_1_transformer_blocks_0_attn1_to_q`` -> ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``."""
    tokens = []
    pos = 0
    while pos < len(name):
        m = _TOKEN.match(name, pos)
        if m is None:
            raise ValueError(name)
        tokens.append(m.group(0))
        pos = m.end() + 1
    return ".".join(tokens)


# ---------------------------------------------------------------------------------------------------------
# diffusers UNet names <-> sgm names for the SDXL layout (3 levels, 2 ResBlocks a level, no attention at
# level 0). The toy model shares this layout (ziplora/architecture), so the same mapping serves both.

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_LEVELS_WITH_ATTENTION_UP = (0, 1)  # up_blocks 0 and 1 (levels 2 and 1) hold transformers in SDXL


def diffusers_unet_to_sgm(path: str) -> str | None:
    """Map a diffusers SDXL UNet module path to the sgm one; None when it is not an SDXL-layout name."""
    for d, s in _TOP_LEVEL.items():
        if path == d or path.startswith(d + "."):
            return s + path[len(d) :]
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        kind, b, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if kind == "down_blocks":
            if part == "downsamplers":
                if j != 0 or not rest.startswith("conv"):
                    return None
                return _join(f"input_blocks.{3 * (b + 1)}.0.op", rest[len("conv") :].lstrip("."))
            block = f"input_blocks.{3 * b + j + 1}"
        else:
            if part == "upsamplers":
                if j != 0 or not rest.startswith("conv"):
                    return None
                index = 2 if b in _LEVELS_WITH_ATTENTION_UP else 1
                return _join(f"output_blocks.{3 * b + 2}.{index}.conv", rest[len("conv") :].lstrip("."))
            block = f"output_blocks.{3 * b + j}"
        if part == "resnets":
            return _resnet(block + ".0", rest)
        return _join(block + ".1", rest)
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        part, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if part == "attentions":
            return _join("middle_block.1", rest) if j == 0 else None
        return _resnet(f"middle_block.{0 if j == 0 else 2}", rest) if j in (0, 1) else None
    return None


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if b else a


def _resnet(block: str, rest: str) -> str | None:
    head, _, tail = rest.partition(".")
    if head not in _RESNET_PARTS:
        return None
    return _join(f"{block}.{_RESNET_PARTS[head]}", tail)


def sgm_unet_to_diffusers(path: str) -> str | None:
    """Inverse of :func:`diffusers_unet_to_sgm` (used by tests and by writers of diffusers files)."""
    for d, s in _TOP_LEVEL.items():
        if path == s or path.startswith(s + "."):
            return d + path[len(s) :]
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        i, k, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        if i == 0:
            return None
        b, j = divmod(i - 1, 3)
        if j == 2:  # a downsampler block
            if k != 0 or not rest.startswith("op"):
                return None
            return _join(f"down_blocks.{b}.downsamplers.0.conv", rest[2:].lstrip("."))
        return _inverse_block(f"down_blocks.{b}", j, k, rest)
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        i, k, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        b, j = divmod(i, 3)
        if rest.startswith("conv") and j == 2 and k == (2 if b in _LEVELS_WITH_ATTENTION_UP else 1):
            return _join(f"up_blocks.{b}.upsamplers.0.conv", rest[4:].lstrip("."))
        return _inverse_block(f"up_blocks.{b}", j, k, rest)
    m = re.match(r"^middle_block\.(\d+)(?:\.(.*))?$", path)
    if m:
        k, rest = int(m.group(1)), m.group(2) or ""
        if k == 1:
            return _join("mid_block.attentions.0", rest)
        if k in (0, 2):
            return _inverse_block_resnet(f"mid_block.resnets.{k // 2}", rest)
    return None


def _inverse_block(prefix: str, j: int, k: int, rest: str) -> str | None:
    if k == 0:
        return _inverse_block_resnet(f"{prefix}.resnets.{j}", rest)
    if k == 1:
        return _join(f"{prefix}.attentions.{j}", rest)
    return None


def _inverse_block_resnet(prefix: str, rest: str) -> str | None:
    for d, s in _RESNET_PARTS.items():
        if rest == s or rest.startswith(s + "."):
            return _join(f"{prefix}.{d}", rest[len(s) :].lstrip("."))
    return None


def sdxl_unet_module_paths() -> frozenset[str]:
    """Every Linear / conv module path of the SDXL-base UNet (the pinned data in ``ziplora/architecture/sdxl_base.json``)."""
    return frozenset(sdxl_base_shapes()["unet"])


# ---------------------------------------------------------------------------------------------------------
# Tensor keys -> (layer key, canonical suffix)

# canonical suffixes, per file suffix
_SUFFIXES = {
    "lora_down.weight": "lora_down",
    "lora_up.weight": "lora_up",
    "lora_mid.weight": "lora_mid",
    "lora_A.weight": "lora_down",
    "lora_B.weight": "lora_up",
    "lora.down.weight": "lora_down",
    "lora.up.weight": "lora_up",
    "lora_linear_layer.down.weight": "lora_down",
    "lora_linear_layer.up.weight": "lora_up",
    "alpha": "alpha",
    "scale": "scale",
    "dora_scale": "dora_scale",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "hada_w1_a": "hada_w1_a",
    "hada_w1_b": "hada_w1_b",
    "hada_w2_a": "hada_w2_a",
    "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1",
    "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1",
    "lokr_w1_a": "lokr_w1_a",
    "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2",
    "lokr_w2_a": "lokr_w2_a",
    "lokr_w2_b": "lokr_w2_b",
    "lokr_t2": "lokr_t2",
    "diff": "diff",
    "diff_b": "diff_b",
    # kinds we recognise only to refuse them by name
    "oft_blocks": "oft_blocks",
    "oft_diag": "oft_diag",
    "rescale": "rescale",
    "on_input": "on_input",
    "w_norm": "w_norm",
    "b_norm": "b_norm",
    "a1.weight": "glora_a1",
    "a2.weight": "glora_a2",
    "b1.weight": "glora_b1",
    "b2.weight": "glora_b2",
    "weight": "ia3_weight",
    "bias": "bias",
}
# diffusers / PEFT files use only these; anything else dotted (``.weight``, ``.bias``) is not a LoRA tensor
_DOTTED_SUFFIXES = sorted(
    (s for s in _SUFFIXES if "lora" in s or s in ("alpha", "lora_magnitude_vector", "dora_scale")),
    key=len,
    reverse=True,
)
_OLD_PROCESSOR = re.compile(r"^(.*?)\.?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


@dataclass(frozen=True)
class ParsedKey:
    """How one tensor key of a file reads: the layer it belongs to (as written), its scheme and suffix."""

    component: str  # unet | te1 | te2 | te (a single SD1/SD2 text encoder) | other
    raw_path: str  # the module path in the file's own scheme, dotted
    scheme: str  # kohya | kohya-diffusers | diffusers
    suffix: str  # canonical suffix
    written: str = ""  # the module's name exactly as the file spells it (for messages and duplicate checks)


def parse_tensor_key(key: str) -> ParsedKey | None:
    """Read one tensor key; None when it is not a layer tensor we know (bundle_emb, unknown prefixes)."""
    if key.startswith("lora_"):
        module, dot, rest = key.partition(".")
        if not dot or rest not in _SUFFIXES:
            return None
        for component, prefix in (("unet", "lora_unet_"), ("te1", "lora_te1_"), ("te2", "lora_te2_"), ("te", "lora_te_")):
            if module.startswith(prefix):
                body = module[len(prefix) :]
                try:
                    path = underscored_to_path(body)
                except ValueError:
                    return None
                scheme = "kohya"
                if component == "unet" and re.match(r"^(down_blocks|up_blocks|mid_block|conv_|time_embedding|add_embedding)", path):
                    scheme = "kohya-diffusers"
                return ParsedKey(component, path, scheme, _SUFFIXES[rest], module)
        return ParsedKey("other", module, "kohya", _SUFFIXES[rest], module)
    # diffusers / PEFT dotted names
    component, body = "other", key
    for prefix, comp in (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"), ("te1.", "te1"), ("te2.", "te2")):
        if key.startswith(prefix):
            component, body = comp, key[len(prefix) :]
            break
    else:
        if re.match(r"^(down_blocks|up_blocks|mid_block)\.", key):
            component = "unet"
    m = _OLD_PROCESSOR.match(body)
    if m:
        module = m.group(1).replace(".processor", "")
        target = m.group(2) + (".0" if m.group(2) == "to_out" else "")
        written = key[: key.rindex("_lora.") + len("_lora")]
        return ParsedKey(component, f"{module}.{target}", "diffusers", "lora_down" if m.group(3) == "down" else "lora_up", written)
    for suffix in _DOTTED_SUFFIXES:
        if body.endswith("." + suffix):
            module = body[: -len(suffix) - 1].replace(".processor", "")
            return ParsedKey(component, module, "diffusers", _SUFFIXES[suffix], key[: -len(suffix) - 1])
    return None
