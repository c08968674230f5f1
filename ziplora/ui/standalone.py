"""``python -m ziplora ui``: the tab alone on the bundled toy model, served on 127.0.0.1 only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ziplora.errors import HostError, InvalidRequestError
from ziplora.ui.compat import gradio_major
from ziplora.ui.layout import build_tab

if TYPE_CHECKING:  # pragma: no cover
    import gradio as gr  # type: ignore[import-untyped]

    from ziplora.hosts.base import Host
    from ziplora.service import MergeService

__all__ = ["make_app", "standalone_host", "launch_standalone", "DEFAULT_TOY_LORA_DIR", "STANDALONE_CONCURRENCY"]

DEFAULT_TOY_LORA_DIR = Path("~/.cache/sd-webui-ziplora/toy-loras")
STANDALONE_CONCURRENCY = 4  # a polled Zip, a preview, a refresh and an interrupt can all be in flight


def make_app(service: MergeService) -> gr.Blocks:
    """The standalone page over ``service`` with the queue on, so Interrupt runs while a Zip is polled."""
    app = build_tab(service, standalone=True)
    if gradio_major() >= 4:
        app.queue(default_concurrency_limit=STANDALONE_CONCURRENCY)
    else:
        app.queue(concurrency_count=STANDALONE_CONCURRENCY)
    return app


def standalone_host(lora_dir: str | None) -> Host:
    """The toy host over ``lora_dir`` (or the default cache folder), holding copies of the bundled LoRAs."""
    from ziplora.hosts.toy import ToyHost

    folder = Path(lora_dir).expanduser() if lora_dir else DEFAULT_TOY_LORA_DIR.expanduser()
    try:
        host = ToyHost.with_bundled_loras(folder)
        host.model  # noqa: B018 - load the bundled model now: a missing one fails at start, not at the first Zip
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("ziplora.toy.assets"):
            raise HostError("the bundled toy model is missing from this install (ziplora/toy/assets)") from None
        raise
    except FileNotFoundError as err:
        raise HostError(f"the bundled toy model is incomplete: {err}") from None
    return host


def launch_standalone(port: int, lora_dir: str | None) -> int:
    """``python -m ziplora ui``: the tab alone on the toy model, on 127.0.0.1 only; blocks until Ctrl-C."""
    import gradio  # noqa: F401 - a clear ImportError before anything loads

    from ziplora.service import MergeService

    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRequestError(f"--port must be between 1 and 65535, got {port!r}")
    host = standalone_host(lora_dir)
    app = make_app(MergeService(host))
    sys.stderr.write(f"ZipLoRA on the toy model: http://127.0.0.1:{port} (LoRAs in {host.lora_dir()}); Ctrl-C stops it\n")
    app.launch(server_name="127.0.0.1", server_port=port, share=False, inbrowser=False, show_api=False, quiet=True)
    return 0
