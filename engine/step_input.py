"""A ``step.run`` step's input: the arguments the function passed to its callable, as JSON.

``await ctx.step.run("charge", charge, order, amount=5)`` records
``{"args": [order], "kwargs": {"amount": 5}}`` with the step, for the history only (the Run page,
``get_run``): replay never reads it back (the function computes its arguments again). Nothing is
stored for a step called without arguments. An input larger than :data:`MAX_INPUT_BYTES` is
replaced by ``{"omitted_bytes": <its size>}``; an argument that has no JSON form (a client, a
connection) by ``{"unserializable": "<its type>"}``: recording the input never fails a step.
``Engine(record_step_input=False)`` or ``create_function(..., record_step_input=False)`` turns it
off, for functions whose arguments hold secrets.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from .serialization import NotSerializable, dumps, dumps_plain, stored_size, to_jsonable

MAX_INPUT_BYTES = 64 * 1024

# What encoding a user's value may raise besides NotSerializable: a cycle or a structure nested
# past Python's recursion limit, a value whose conversion (a model's dump) fails.
_UNENCODABLE = (NotSerializable, RecursionError, ValueError, TypeError)


def _model(value: Any) -> Any:
    """orjson's hook for what it does not know: a pydantic model as its JSON form."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"a value of type {type(value).__name__} cannot be stored as JSON")


try:  # the step path's encoder: orjson walks a value about 50 times faster than to_jsonable
    import orjson

    def _encoded(value: Any) -> bytes:
        """UTF-8 JSON of ``value`` that PostgreSQL can store; raises when it has none."""
        data = orjson.dumps(value, default=_model)  # refuses lone surrogates
        if b"\\u0000" in data:  # a NUL, perhaps (or an escaped backslash before "u0000")
            stored_size(data.decode())
        return data

except ImportError:  # pragma: no cover - depends on the environment

    def _encoded(value: Any) -> bytes:
        text = dumps(value)
        stored_size(text)
        return text.encode()


class StepInput(BaseModel):
    """The arguments a ``step.run`` step's callable was given (its last attempt's)."""

    model_config = ConfigDict(frozen=True)

    args: list[Any] = []
    """The positional arguments, as JSON (a value with no JSON form: ``{"unserializable":
    "<its type>"}``)."""
    kwargs: dict[str, Any] = {}
    """The keyword arguments, likewise."""
    omitted_bytes: int | None = None
    """The input's JSON size when it was over the limit (64 KiB) and not stored; ``args`` and
    ``kwargs`` are then empty."""


def encode_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], limit: int = MAX_INPUT_BYTES
) -> str | None:
    """The JSON text to record for a call with these arguments; None when there are none."""
    if not args and not kwargs:
        return None
    try:
        data = _encoded({"args": args, "kwargs": kwargs})
    except _UNENCODABLE:
        shown = {
            "args": [_shown(a) for a in args],
            "kwargs": {k: _shown(v) for k, v in kwargs.items()},
        }
        data = dumps(shown).encode()  # plain values now (integers past 64 bits included)
    if len(data) > limit:
        return dumps_plain({"omitted_bytes": len(data)})
    return data.decode()


def _shown(value: Any) -> Any:
    """A value as JSON when it has a form PostgreSQL can store, else a marker naming its type."""
    try:
        plain = to_jsonable(value)  # the thorough walk: integers past 64 bits, keys checked
        stored_size(dumps(plain))
    except _UNENCODABLE:
        kind = type(value)
        return {"unserializable": f"{kind.__module__}.{kind.__qualname__}"}
    return plain
