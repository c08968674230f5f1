"""The AUTOMATIC1111 host (v1.10.1): ZipLoRA on the loaded SDXL checkpoint (``shared.sd_model``), its queue lock,
progress bar and Interrupt button, and the built-in Lora extension's folder and list.

Where things are:

- ``host.py``                 ``A1111Host``: LoRA folders and list, refresh after a write, the queue / progress bar /
                              Interrupt, the session (the order in which A1111 is changed for a job, and undone)
- ``session.py``              ``A1111Session``: the checkpoint's networks, prompt encoding, prediction, schedule, VAE
- ``checks.py``               what is refused before anything changes (not SDXL base, --lowvram, fp8, TensorRT...)
- ``user_loras.py``           the user's LoRAs and hypernetworks off for a job and back after; unbaking a rewritten file
- ``training_mode.py``        frozen parameters, sgm's checkpoint flags off, a cross-attention with a backward pass
- ``open_clip_attention.py``  open_clip's fused attention seen as q/k/v/out Linears while a job needs them
- ``preview.py``              the A/B preview through A1111's own txt2img

Settings > ZipLoRA are read in ``ziplora.hosts.settings`` (for Forge too). Every WebUI module (``modules.*``, the
Lora extension's ``networks``) is imported inside functions, so the package imports anywhere. What it relies on,
with A1111 file and function names, is in docs/a1111.md.

A session changes host state only for the job and undoes all of it on exit, whatever happened:
- the built-in Lora's weights: A1111 bakes a prompt's ``<lora:...>`` into the weights in place, lazily, and
  keeps them baked until a module's next forward with another set; the session puts every baked module back
  to its backup and empties ``networks.loaded_networks``, and afterwards restores that list, so A1111
  re-applies the user's LoRAs on its next forward exactly as after any change of networks;
- ``requires_grad`` of every parameter (A1111 leaves the UNet's at True), sgm's own checkpoint flags;
- the cross-attention optimisation (switched to SDP for the backward pass, then back to the user's);
- open_clip's fused ``nn.MultiheadAttention`` in the second text encoder, seen through q/k/v/out ``Linear``
  views while the job needs them (LoRA files name those projections; the model has one fused matrix).
"""

from ziplora.hosts.a1111.host import A1111Host
from ziplora.hosts.a1111.open_clip_attention import MultiheadAttentionAsLinears
from ziplora.hosts.a1111.session import A1111Session, strip_extra_networks

__all__ = ["A1111Host", "A1111Session", "MultiheadAttentionAsLinears", "strip_extra_networks"]
