"""Reading the LoRA-targetable weight shapes off a module tree (Linear and conv weights: 2-D or 4-D)."""

from __future__ import annotations

from torch import nn

__all__ = ["Shapes", "weight_shapes", "encoder_layer_shapes"]

Shapes = dict[str, tuple[int, ...]]  # module path -> weight shape ([out, in] or [out, in, kh, kw]), in module order


def weight_shapes(model: nn.Module) -> Shapes:
    """Every module with a 2-D or 4-D ``weight`` (Linear, conv; also embedding tables, so not for text encoders)."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() in (2, 4):
            out[name] = tuple(int(d) for d in weight.shape)
    return out


def encoder_layer_shapes(text_encoder: nn.Module, with_projection: bool = False) -> Shapes:
    """A CLIP text encoder's LoRA targets: the attention and MLP Linears of its layers (and its text_projection)."""
    shapes = {name: shape for name, shape in weight_shapes(text_encoder).items() if name.startswith("text_model.encoder.layers.")}
    if with_projection:
        shapes.update({name: shape for name, shape in weight_shapes(text_encoder).items() if name == "text_projection"})
    return shapes
