"""SDXL's network layouts, neutral ground for the formats, the toy world and the benchmarks.

- ``sgm_unet``: sgm's ``UNetModel`` classes and ``UNetConfig`` (``UNetConfig.sdxl_base()`` is SDXL base's);
- ``clip_text``: CLIP text encoders in Hugging Face names and ``TextEncoderConfig`` (SDXL's two included);
- ``sdxl_base``: SDXL base's LoRA-targetable module paths and weight shapes, pinned as data (``sdxl_base.json``);
- ``toyxl``: the bundled toy model's configurations and the weight shapes they give;
- ``shapes``: reading weight shapes off a module tree.

Imports torch only; nothing here knows about LoRA files.
"""
