"""Validation errors as operators read them: one ``"key.path: problem"`` line each."""

from __future__ import annotations

import types
import typing
from typing import Any

import pydantic

_VALUE_ERROR = "Value error, "


def format_validation_errors(err: pydantic.ValidationError, unknown_key: str = "unknown key") -> list[str]:
    """One line per problem in ``err``: ``"key.path: message"``.

    The path joins the error's location with dots (``(top level)`` when it has
    none); the message is pydantic's, without the ``"Value error, "`` it puts
    before the text a validator raised, and ``unknown_key`` for a key the model
    forbids.
    """
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = unknown_key
        elif msg.startswith(_VALUE_ERROR):
            msg = msg[len(_VALUE_ERROR):]
        out.append(f"{loc}: {msg}")
    return out


_NUMBER_TYPES: frozenset[Any] = frozenset({int, float})


def _unwrap(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of ``annotation``: ``Annotated`` metadata and ``Optional`` dropped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return tuple(a for arg in typing.get_args(annotation) if arg is not type(None) for a in _unwrap(arg))
    return (annotation,)


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, pydantic.BaseModel)


def strict_type_errors(model: type[pydantic.BaseModel], data: Any, prefix: str = "") -> list[str]:
    """Numbers written as something else in a parsed TOML ``data`` for ``model``, as
    ``"key.path: message"`` lines (may be empty).

    pydantic's lax mode turns ``poll_interval = "15"`` into 15.0, ``true`` into 1 and
    ``15.0`` into the integer 15; its strict mode cannot be switched on for the whole
    configuration (some keys parse strings on purpose, e.g. ``"managedsave:300"``).
    This check walks ``data`` along the model's fields and flags, for a key whose type is
    only a number (int or float, optionally None): a string, a boolean, and a float for
    an integer. Nested models are followed through tables, arrays of tables and tables
    of tables; every other key is left to the model's own validation.
    """
    if not isinstance(data, dict):
        return []
    out: list[str] = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        path = f"{prefix}{key}"
        kinds = _unwrap(field.annotation)
        out.extend(_number_error(path, kinds, value))
        for kind in kinds:
            out.extend(_nested_errors(kind, value, path))
    return out


def _number_error(path: str, kinds: tuple[Any, ...], value: Any) -> list[str]:
    if not kinds or not set(kinds) <= _NUMBER_TYPES or value is None:
        return []
    want = "an integer" if kinds == (int,) else "a number"
    if isinstance(value, str):
        return [f"{path}: expected {want}, got the string {value!r} (TOML types are strict: no quotes around "
                f"numbers)"]
    if isinstance(value, bool):
        return [f"{path}: expected {want}, got the boolean {str(value).lower()}"]
    if kinds == (int,) and isinstance(value, float):
        return [f"{path}: expected an integer, got {value!r}"]
    return []


def _nested_errors(kind: Any, value: Any, path: str) -> list[str]:
    if _is_model(kind):
        return strict_type_errors(kind, value, f"{path}.")
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    out: list[str] = []
    if origin in (tuple, list) and args and isinstance(value, list):
        for item_kind in _unwrap(args[0]):
            if _is_model(item_kind):
                for i, item in enumerate(value):
                    out.extend(strict_type_errors(item_kind, item, f"{path}.{i}."))
    elif origin is dict and len(args) == 2 and isinstance(value, dict):
        for item_kind in _unwrap(args[1]):
            if _is_model(item_kind):
                for name, item in value.items():
                    out.extend(strict_type_errors(item_kind, item, f"{path}.{name}."))
    return out
