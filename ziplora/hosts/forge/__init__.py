"""The Forge 2 host: ZipLoRA on the model Stable Diffusion WebUI Forge (``lllyasviel``, branch main) has loaded.

Where things are:

- ``host.py``        ``ForgeHost``: the LoRA folder and caches, the queue / progress bar / Interrupt, the session
                     (the order in which Forge's model is changed for a job, and undone)
- ``session.py``     ``ForgeSession``: the model's networks, prompt encoding, prediction, schedule, VAE
- ``engine.py``      finding Forge and its loaded model, and what is refused there (old Forge, forks, not SDXL base)
- ``user_loras.py``  the user's LoRAs off for a job (the LoRA-free patchers, loaded the Forge way)
- ``autograd.py``    making Forge's UNet usable for autograd, and undoing it: inference tensors, flags, hooks, casts
- ``quantised.py``   NF4 / GGUF layers: recognised, lent their shape, probed for a backward pass
- ``memory.py``      Forge's memory management: what to keep free, the CPU-swapped load that is refused
- ``preview.py``     the A/B preview through Forge's own txt2img

Settings > ZipLoRA are read in ``ziplora.hosts.settings`` (for A1111 too).

What differs from AUTOMATIC1111, and why this package exists (details and sources in docs/forge.md):

- Forge applies LoRAs by baking them into new weight Parameters (or, on low-bit models, merging them on the fly
  under inference mode). The job therefore loads the LoRA-free patchers (``forge_objects_original``) through
  Forge's own ``memory_management.load_models_gpu``, which restores the original weights; the user's next
  generation loads their LoRA patcher again and Forge re-applies the LoRAs itself.
- Forge builds its models under ``torch.inference_mode()``: the UNet's weights are inference tensors that
  autograd refuses. They are replaced, in place and value for value, by ordinary clones.
- Forge's transformer blocks add residuals in place (``x += n``), which corrupts what LayerNorm saved for
  backward: the inputs of ``norm1`` / ``norm2`` are cloned by pre-hooks while gradients are on.
- Forge's Linear is not a ``torch.nn.Linear``, and NF4 / GGUF / fp8 layers have no weight one can add to: the
  core finds layers by what they are, and the session tells it which layers must take the side path.

Every Forge import happens inside a function, so importing this package never needs Forge.
"""

from ziplora.hosts.forge.engine import forge_version
from ziplora.hosts.forge.host import ForgeHost
from ziplora.hosts.forge.session import ForgeSession

__all__ = ["ForgeHost", "ForgeSession", "forge_version"]
