"""JSON in and out of the database: step outputs, run outputs, event data.

Everything the engine records is JSON, so a value comes back from a step as its JSON round trip
(a tuple as a list, a pydantic model as a dict unless the step callable declares the model as
its return type). ``orjson`` is used when installed; the standard library otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

try:  # optional speed-up, never needed for correctness
    import orjson

    def _dumps(value: Any) -> str:
        return orjson.dumps(value).decode()

    loads: Callable[[str | bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(value: Any) -> str:
        return json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)

    loads = json.loads


class NotSerializable(TypeError):
    """A value that has no JSON form. The message names the offending type."""


def to_jsonable(value: Any) -> Any:
    """Turns pydantic models and dataclasses (anywhere inside ``value``) into plain JSON types."""
    # The plain types first, by exact type: what steps return is mostly these, and the checks
    # for a model (an ABC's isinstance) and a dataclass cost more than the rest of the walk.
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:
        return {_key(k): to_jsonable(v) for k, v in value.items()}
    if kind is list:
        return [to_jsonable(v) for v in value]
    if kind is float and math.isfinite(value):
        return value
    return _other_to_jsonable(value)


def _other_to_jsonable(value: Any) -> Any:
    """:func:`to_jsonable` of a value that is not of a plain type exactly (a model, a dataclass,
    a tuple, a subclass of a plain type) or is not JSON at all."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {_key(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise NotSerializable(f"{value!r} is not a JSON number")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise NotSerializable(f"a value of type {type(value).__name__} cannot be stored as JSON")


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    raise NotSerializable(f"a dict key of type {type(key).__name__} cannot be stored as JSON")


# U+0000 escaped in JSON text (after an even number of backslashes: not a literal "\u0000"):
# valid JSON, but PostgreSQL's jsonb and text cannot store it.
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_HAS_NUL = "it contains a NUL character (U+0000), which PostgreSQL cannot store"
_HAS_SURROGATE = "it contains a lone surrogate (half of a UTF-16 pair), which is not valid Unicode"


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store ``text`` (a NUL, a lone surrogate), or None if it can."""
    if "\x00" in text:
        return _HAS_NUL
    try:
        text.encode()
    except UnicodeEncodeError:
        return _HAS_SURROGATE
    return None


def stored_size(json_text: str) -> int:
    """The UTF-8 size of JSON text PostgreSQL will accept.

    Raises:
        NotSerializable: the text holds what PostgreSQL cannot store: a NUL character, or a
            lone surrogate (half of a UTF-16 pair, which has no UTF-8 form).
    """
    if _NUL.search(json_text):
        raise NotSerializable(_HAS_NUL)
    try:
        return len(json_text.encode())
    except UnicodeEncodeError:
        raise NotSerializable(_HAS_SURROGATE) from None


def dumps(value: Any) -> str:
    """Encodes a value as JSON text; raises :class:`NotSerializable` with a readable reason."""
    plain = to_jsonable(value)
    try:
        return _dumps(plain)
    except (TypeError, ValueError) as exc:  # e.g. integers beyond 64 bits for orjson
        try:
            return json.dumps(plain, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError):
            raise NotSerializable(str(exc)) from exc


def dumps_plain(value: Any) -> str:
    """Encodes a value the engine built of plain JSON values (strings, numbers, None, and dicts
    and lists of them: a step record, events checked for sending): :func:`dumps` without its
    walk for models and dataclasses, which costs more than the encoding on the step path. Falls
    back to :func:`dumps` on anything else."""
    try:
        return _dumps(value)
    except (TypeError, ValueError):
        return dumps(value)


def restore(value: Any, annotation: Any) -> Any:
    """Turns a stored JSON value back into ``annotation`` when that is a pydantic model."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and value is not None:
        return annotation.model_validate(value)
    return value


def loads_or_none(text: str | None) -> Any:
    """Decodes JSON text from the database, keeping SQL NULL as ``None``."""
    return None if text is None else loads(text)
