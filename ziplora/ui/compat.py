"""What differs between gradio 3.41 (A1111) and 4.x (Forge), in one place; everything else uses APIs both share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["gradio_major", "js_kwargs", "api_kwargs", "file_paths"]


def gradio_major() -> int:
    """gradio's major version: 3 in A1111 (3.41.2), 4 in Forge (4.40.0)."""
    import gradio as gr  # type: ignore[import-untyped]

    return int(str(gr.__version__).split(".")[0])


def js_kwargs(code: str) -> dict[str, str]:
    """The keyword for a browser-side hook: ``_js`` on gradio 3, ``js`` on gradio 4 and later."""
    return {"js": code} if gradio_major() >= 4 else {"_js": code}


def api_kwargs() -> dict[str, Any]:
    """Keep the tab's events out of the WebUI's API (the project has its own route). gradio 4's browser client
    logs "Too many arguments provided for the endpoint" for such events; that is noise, not a failure."""
    return {"api_name": False}


def file_paths(value: Any) -> tuple[str, ...]:
    """Paths from a gr.File value: gradio 4 gives str paths, gradio 3 tempfile objects (``.name``)."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, (str, Path)):
            out.append(str(item))
        elif isinstance(item, dict) and (item.get("path") or item.get("name")):
            out.append(str(item.get("path") or item.get("name")))
        elif getattr(item, "name", None):
            out.append(str(item.name))
    return tuple(out)
