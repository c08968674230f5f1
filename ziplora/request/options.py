"""How a request field is declared, and the checks every face shares.

A request is a frozen dataclass whose fields are declared with :func:`option`: the annotation gives the type, the
call gives the default (or ``REQUIRED``), the bounds or choices, the one-line help and the faces that show it.
Everything else is derived from that one line: the validation (:func:`validate`), the API's reading of JSON
(:func:`from_json`), the CLI's flags (``ziplora.request.flags``) and the tab's controls (``ziplora.ui.controls``),
so a field has the same name, default and error message on every face.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ziplora.errors import InvalidRequestError

__all__ = ["FACES", "REQUIRED", "Option", "option", "reuse", "options", "check_number", "check_value", "validate", "from_json"]

FACES = ("cli", "api", "tab")
REQUIRED: Any = dataclasses.MISSING  # option(REQUIRED, ...): a field without a default
KINDS = {str: "text", int: "int", float: "number", bool: "bool"}
R = TypeVar("R")


@dataclass(frozen=True)
class Option:
    """One declared field. ``name``, ``kind``, ``default``, ``required`` and ``optional`` are filled in by
    :func:`options` from the dataclass field; the rest is what ``option(...)`` was given."""

    label: str  # its name in messages and, capitalised, the tab's label: "learning rate"
    help: str  # one line: the CLI's --help, the tab's info text
    lo: float | None = None  # numbers: the closed range [lo, hi]
    hi: float | None = None
    choices: tuple[str, ...] = ()  # text: the values it may take
    multiple_of: int | None = None
    max_length: int | None = None  # text: at most this many characters
    check: Callable[[Any], Any] | None = None  # a rule of its own (output names, picks): returns the value to keep
    faces: tuple[str, ...] = FACES  # where it is offered: "cli", "api", "tab"
    flag: str | None = None  # the CLI's name when not --the-field-name ("output": a positional argument)
    aliases: tuple[str, ...] = ()  # further CLI flags, kept so old command lines still work
    # filled in from the dataclass field
    name: str = ""
    kind: str = ""  # text | int | number | bool | paths
    default: Any = None
    required: bool = False
    optional: bool = False  # None is allowed (and means "the host's default")

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def option(default: Any, label: str, help: str, **declared: Any) -> Any:
    """A dataclass field declared once: ``steps: int = option(100, "steps", "one line", lo=1, hi=1000)``."""
    spec = Option(label, help, **declared)
    if default is REQUIRED:
        return dataclasses.field(metadata={"option": spec})
    return dataclasses.field(default=default, metadata={"option": spec})


def reuse(owner: type, name: str, default: Any = REQUIRED) -> Any:
    """Another request's declaration of ``name`` (same label, bounds, help), with its own default."""
    spec = next(o for o in options(owner) if o.name == name)
    kept = {f.name: getattr(spec, f.name) for f in dataclasses.fields(Option) if f.name not in _FILLED}
    return option(default, **kept)


_FILLED = ("name", "kind", "default", "required", "optional")


def options(cls: type, face: str | None = None) -> tuple[Option, ...]:
    """The declared fields of a request class in declaration order (only those offered on ``face`` if given)."""
    if (cls, face) not in _DECLARED:
        _DECLARED[cls, face] = _declared(cls, face)
    return _DECLARED[cls, face]


_DECLARED: dict[tuple[type, str | None], tuple[Option, ...]] = {}


def _declared(cls: type, face: str | None) -> tuple[Option, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with option()")
        kind, optional = _kind(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default
        out.append(dataclasses.replace(spec, name=f.name, kind=kind, default=default, required=required, optional=optional))
    return tuple(o for o in out if face is None or face in o.faces)


def _kind(annotation: Any) -> tuple[str, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return _kind(inner[0])[0], True
    if typing.get_origin(annotation) is tuple:
        return "paths", False
    return KINDS[annotation], False


# -- the checks ------------------------------------------------------------------------------------------------
def shown(value: Any) -> str:
    """A value as a message quotes it: 9.0 as 9, so the command line (which reads 9 as 9.0) says what JSON's 9 says."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(int(value))
    return repr(value)


def check_number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> None:
    """A finite number in [lo, hi] (a whole one if ``integer``), else a one-line ``InvalidRequestError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        kind = "a whole number" if integer else "a number"
        raise InvalidRequestError(f"{name} must be {kind}, got {shown(value)}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidRequestError(f"{name} must be between {lo:g} and {hi:g}, got {shown(value)}")


def check_value(spec: Option, value: Any) -> Any:
    """``value`` checked against its declaration: the value to keep (whole numbers as int, lists as tuples),
    or a one-line ``InvalidRequestError`` that every face shows the same."""
    if value is None and spec.optional:
        return None
    if spec.check is not None:
        value = spec.check(value)
    if spec.kind in ("int", "number"):
        check_number(spec.label, value, spec.lo if spec.lo is not None else -math.inf, spec.hi if spec.hi is not None else math.inf,
                     integer=spec.kind == "int")  # fmt: skip
        if spec.multiple_of and value % spec.multiple_of:
            raise InvalidRequestError(f"{spec.label} must be a multiple of {spec.multiple_of}, got {shown(value)}")
        return int(value) if spec.kind == "int" else value
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise InvalidRequestError(f"{spec.label} must be true or false")
        return value
    if spec.kind == "paths":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InvalidRequestError(f"{spec.label} must be a list of file paths")
        return tuple(value)
    if not isinstance(value, str) or (spec.max_length is not None and len(value) > spec.max_length):
        raise InvalidRequestError(f"{spec.label} must be text" + (f" under {spec.max_length} characters" if spec.max_length else ""))
    if spec.choices and value not in spec.choices:
        raise InvalidRequestError(f"{spec.label} must be one of {', '.join(spec.choices)}, got {shown(value)}")
    return value


def validate(request: R) -> R:
    """A checked copy of ``request``, every field through :func:`check_value` in declaration order."""
    values = {o.name: check_value(o, getattr(request, o.name)) for o in options(type(request))}
    return dataclasses.replace(request, **values)  # type: ignore[type-var]


def from_json(cls: type[R], data: Any, face: str = "api") -> R:
    """A request from a JSON object: unknown keys and missing required ones are errors, never dropped or guessed."""
    if not isinstance(data, Mapping):
        raise InvalidRequestError("the request must be a JSON object")
    known = {o.name for o in options(cls, face)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidRequestError(f"unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    missing = [o.name for o in options(cls, face) if o.required and o.name not in data]
    if missing:
        raise InvalidRequestError(f"missing {missing[0]!r}")
    return cls(**data).validated()  # type: ignore[attr-defined, no-any-return]
