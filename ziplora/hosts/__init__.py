"""Hosts: one adapter per place the model lives, all behind ``ziplora.hosts.base.Host``.

``webui_host()`` picks the adapter once, when the extension loads: Forge 2 when its backend imports,
AUTOMATIC1111 otherwise. Nothing else in the project asks which WebUI it runs in.
"""

from __future__ import annotations

import importlib.util

from ziplora.hosts.base import Host

__all__ = ["webui_host", "running_in_forge"]


def running_in_forge() -> bool:
    """Forge 2 ships ``backend`` (memory_management, patcher) and ``modules_forge``; A1111 has neither."""
    return importlib.util.find_spec("backend") is not None and importlib.util.find_spec("modules_forge") is not None


def webui_host() -> Host:
    if running_in_forge():
        from ziplora.hosts.forge import ForgeHost

        return ForgeHost()
    from ziplora.hosts.a1111 import A1111Host

    return A1111Host()
