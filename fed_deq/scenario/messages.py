"""One-line error messages: ``<source>: <dotted.key.path>: <what is wrong>``.

pydantic reports every problem it finds; a user fixes one at a time, so the first one (unknown keys first,
they are usually the cause of the rest) becomes one line in the form the rest of fed-deq prints.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from fed_deq.errors import InputError

#: The error type of a scenario rule (a cross-field check, a choice, a list that must be a list).
RULE = "scenario_rule"

_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string"}
_UNKNOWN_KEY = ("extra_forbidden", "invalid_key")  # invalid_key: not a string, so not a key of the schema
_TYPE_NAMES = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def failure(key: str, message: str) -> PydanticCustomError:
    """A validation error at ``key`` (dotted, relative to the model that raises it; "" for the model itself)."""
    return PydanticCustomError(RULE, "{message}", {"key": key, "message": message})


def did_you_mean(word: str, choices: list[str]) -> str:
    """'; did you mean 'x'?' for a misspelt value or tier name, else ''."""
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def join(path: str, key: str) -> str:
    """``path.key``; ``key`` at the top, ``path`` for an empty key."""
    return f"{path}.{key}" if path and key else path or key


def show(value: Any) -> str:
    """A value as messages quote it: strings in quotes, the rest as Python prints them."""
    return repr(value) if isinstance(value, str) else str(value)


def type_name(value: Any) -> str:
    """'a mapping', 'a list', 'null', ... for the YAML type of ``value``."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------------------
# Where a key lives in the schema.


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds (also an optional one), or the item model of a list field; None for a
    plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is tuple:
        return model_of(typing.get_args(annotation)[0])
    inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if len(inner) == 1 and len(typing.get_args(annotation)) == 2:  # an optional section, ``Section | None``
        return model_of(inner[0])
    return None


def is_list(annotation: Any) -> bool:
    """True for the list fields (``fleet.tiers``, ``adversaries``)."""
    return typing.get_origin(annotation) is tuple


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model that owns the keys at ``loc`` (list indices step into the list's item model)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = model_of(model.model_fields[part].annotation)
    return model


def field_at(root: type[BaseModel], loc: tuple) -> FieldInfo | None:
    """The field a ``loc`` ends on, or None."""
    named = [i for i, part in enumerate(loc) if isinstance(part, str)]
    if not named:
        return None
    owner = model_at(root, loc[:named[-1]])
    return owner.model_fields.get(loc[named[-1]]) if owner is not None else None


def key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key path of the schema (list items shown as ``<tier>``/``<index>``)."""
    paths = []
    for name, info in model.model_fields.items():
        path = join(prefix, name)
        paths.append(path)
        child = model_of(info.annotation)
        if child is not None:
            item = "<tier>" if name == "tiers" else "<index>"
            paths.extend(key_paths(child, f"{path}.{item}" if is_list(info.annotation) else path))
    return paths


def suggest_key(word: str, valid: list[str], prefix: str, root: type[BaseModel]) -> str:
    """Closest valid key in the same section, else the same key in another section, else the valid keys."""
    match = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    if match:
        return f"; did you mean {join(prefix, match[0])}?"
    elsewhere = [path for path in key_paths(root) if path.rsplit(".", 1)[-1] == word]
    if elsewhere:
        # A key put in the wrong section ('rounds' at top level) is pointed to where it belongs.
        return f"; did you mean {elsewhere[0]}?"
    return f" (valid keys: {', '.join(valid)})"


# --------------------------------------------------------------------------------------------------------
# pydantic's ValidationError → one line.


def one_line(exc: ValidationError, source: str, root: type[BaseModel]) -> InputError:
    """The first problem of ``exc`` as ``InputError("<source>: <path>: <what>")``."""
    errors = exc.errors(include_url=False)
    first = min(errors, key=lambda error: error["type"] not in _UNKNOWN_KEY)  # stable: file order otherwise
    loc = tuple(first["loc"])
    path = ".".join(str(part) for part in loc)
    return InputError(f"{source}: {_describe(first, loc, path, root)}")


def _describe(error: dict, loc: tuple, path: str, root: type[BaseModel]) -> str:
    kind, value = error["type"], error.get("input")
    if kind == RULE:
        return f"{join(path, error['ctx']['key']) or 'top level'}: {error['ctx']['message']}"
    if kind in _UNKNOWN_KEY:
        owner = model_at(root, loc[:-1])
        prefix = ".".join(str(part) for part in loc[:-1])
        valid = list(owner.model_fields) if owner is not None else []
        return f"{path}: unknown key{suggest_key(str(loc[-1]), valid, prefix, root)}"
    if kind == "missing":
        return f"{path}: missing (required)"
    if kind in ("model_type", "dict_type"):
        return f"{path or 'top level'}: must be a mapping, got {type_name(value)}"
    if kind == "finite_number":
        return f"{path}: must be a number (finite), got {value!r}"
    if kind in ("string_too_short", "string_pattern_mismatch"):
        return f"{path}: must be a non-empty string, got {value!r}"
    info = field_at(root, loc)
    if kind in _EXPECTED:
        nullable = " or null" if info is not None and _nullable(info) else ""
        return f"{path}: must be {_EXPECTED[kind]}{nullable}, got {show(value)} ({type_name(value)})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and info is not None:
        is_float = _base_type(info) is float
        shown = float(value) if is_float else value
        return f"{path}: must be {'a number' if is_float else 'an integer'} {range_text(info)}, got {show(shown)}"
    message = error["msg"]
    return f"{path}: {message[:1].lower()}{message[1:]}"


def range_text(info: FieldInfo) -> str:
    """A field's interval as messages want it: '>= 1', 'in (0, 1]'."""
    names = [type(item).__name__.lower() for item in info.metadata]
    bounds = {name: getattr(item, name) for name, item in zip(names, info.metadata) if name in ("ge", "gt", "le", "lt")}
    low = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds.get("ge"))
    high = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds.get("le"))
    if high[1] is None:
        return f"{'>' if low[0] == '(' else '>='} {_num(low[1])}"
    if low[1] is None:
        return f"{'<' if high[0] == ')' else '<='} {_num(high[1])}"
    return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"


def _num(value: float) -> str:
    """Print 1.0 as 1 in messages."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _nullable(info: FieldInfo) -> bool:
    return type(None) in typing.get_args(info.annotation)


def _base_type(info: FieldInfo) -> Any:
    options = [arg for arg in typing.get_args(info.annotation) if arg is not type(None)]
    return options[0] if options else info.annotation
