"""Hosts: one adapter per place the model lives, all behind ``ziplora.hosts.base.Host``.

- ``base.py``        the protocol (``Host``, ``ModelSession``, ``SessionOptions``) and the file-only host
- ``toy.py``         the bundled toy model (demo, standalone tab, tests)
- ``a1111/``         AUTOMATIC1111 v1.10.1, split by concern (its ``__init__`` lists the files)
- ``forge/``         Forge 2, split by concern (its ``__init__`` lists the files)
- ``settings.py``    Settings > ZipLoRA, declared and read here for both WebUIs
- ``embeddings.py``  the source LoRAs' bundled embeddings a job hands a WebUI host, and putting a database back

``webui_host()`` picks the adapter once, when the extension loads: Forge 2 when its backend imports,
AUTOMATIC1111 otherwise. Nothing else in the project asks which WebUI it runs in. Only this package imports
WebUI modules, always inside functions.
"""

from __future__ import annotations

import importlib.util

from ziplora.hosts.base import Host

__all__ = ["webui_host", "running_in_forge"]


def running_in_forge() -> bool:
    """Any Forge ships ``modules_forge``; A1111 does not. Old Forge and the forks get ForgeHost too, which
    refuses them with a clear message instead of half-working as if they were A1111."""
    return importlib.util.find_spec("modules_forge") is not None


def webui_host() -> Host:
    if running_in_forge():
        from ziplora.hosts.forge import ForgeHost

        return ForgeHost()
    from ziplora.hosts.a1111 import A1111Host

    return A1111Host()
