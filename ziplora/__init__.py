"""sd-webui-ziplora: merge a subject LoRA and a style LoRA for SDXL with ZipLoRA into one ordinary LoRA.

The package is a pure library (torch, safetensors, numpy); the WebUI glue lives in ``ziplora.hosts`` and
the tab in ``ziplora.ui``, both imported only where needed.
"""

__version__ = "0.1.0"
