"""The command line's flags for a request, derived from its declaration (``ziplora.request.fields``).

Each field offered on the "cli" face is ``--the-field-name`` (or its declared ``flag``; a flag without dashes is a
positional argument). Values are read as text and turned into numbers here, never by argparse, so a bad value
fails in the shared check with the same one-line message as in the API and the tab.
"""

from __future__ import annotations

import argparse
from typing import Any

from ziplora.request.options import Option, options

__all__ = ["add_flags", "flag_values"]


def add_flags(parser: argparse.ArgumentParser, request: type, *, files: tuple[str, ...] = ()) -> None:
    """One argument per field of ``request`` offered on the command line; the fields in ``files`` take a file
    there (a LoRA's name elsewhere)."""
    for spec in options(request, "cli"):
        text = (f"the {spec.label} file" if spec.name in files else spec.help).replace("%", "%%")
        if not spec.cli_flag.startswith("-"):
            parser.add_argument(spec.name, metavar=spec.cli_flag.upper(), type=_reader(spec), help=text)
            continue
        kw: dict[str, Any] = {"dest": spec.name, "help": text}
        if spec.kind == "bool":
            kw.update(action=argparse.BooleanOptionalAction, default=spec.default)
        elif spec.required:
            kw.update(required=True, type=_reader(spec))
        else:
            kw.update(default=spec.default, type=_reader(spec), help=f"{text} (default: {_shown(spec)})")
            if spec.kind == "paths":
                kw["nargs"] = "+"
        if spec.kind != "bool":
            kw["metavar"] = "{" + ",".join(spec.choices) + "}" if spec.choices else "FILE" if spec.name in files else _METAVARS[spec.kind]
        parser.add_argument(spec.cli_flag, *spec.aliases, **kw)


def flag_values(args: argparse.Namespace, request: type) -> dict[str, Any]:
    """The parsed values of ``request``'s fields, by field name."""
    return {spec.name: getattr(args, spec.name) for spec in options(request, "cli")}


_METAVARS = {"int": "N", "number": "X", "text": "TEXT", "paths": "FILE"}


def _shown(spec: Option) -> str:
    if spec.default is None:
        return "unset"
    return {(): "none", "": '""'}.get(spec.default, str(spec.default))


def _reader(spec: Option) -> Any:
    """Text -> the value to check: a number where the text is one, else the text itself (the check says why not)."""

    def read(text: str) -> Any:
        if spec.kind == "int":
            for parse in (int, float):
                try:
                    return parse(text)
                except ValueError:
                    pass
        if spec.kind == "number":
            try:
                return float(text)
            except ValueError:
                pass
        return text

    return read
