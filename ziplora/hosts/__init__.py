"""Hosts: one adapter per place the model lives, all behind ``ziplora.hosts.base.Host``.

``webui_host()`` picks the adapter once, when the extension loads: Forge 2 when its backend imports,
AUTOMATIC1111 otherwise. Nothing else in the project asks which WebUI it runs in.
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
