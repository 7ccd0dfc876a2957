"""Validation errors as operators read them: one ``"key.path: problem"`` line each."""

from __future__ import annotations

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
