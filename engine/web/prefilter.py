"""A search's prefilter: the common part of a CEL expression over ``event`` as a SQL/JSON path
predicate, which PostgreSQL checks against each run's event before any reaches Python.

The predicate may only ever keep *more* runs than the expression, never fewer: every event the
expression matches, the predicate matches too (CEL, evaluated after it, stays the judge). So it
translates only what it can over-approximate soundly, and a part it cannot translate matches
everything:

* ``event.<path> == / < / <= / > / >=`` a number or a boolean (booleans compare as 0 and 1, as in
  the engine's CEL; a number within a tiny margin, since CEL compares doubles and PostgreSQL
  exact decimals), ``==`` a string;
* ``event.<path> in [literal, ...]``;
* ``event.<path>.startsWith("...")``, ``.contains("...")`` (of a string, a list's items or a
  map's keys) and ``.endsWith("...")``;
* ``has(event.<path>)``;
* ``&&`` and ``||`` of those, in parentheses or not.

Negations (``!``, ``!=``), comparisons with ``null`` and with strings by order, ternaries and
other functions are left to CEL: the part of an ``&&`` that holds them keeps every run, an
``||`` that holds them keeps every run. A path step is a field name (``event.data.a``) or a
string index (``event.data["a"]``); in lax mode a path also looks into arrays, which only keeps
more.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import celpy
import lark

_ENV = celpy.Environment()
_PASS_THROUGH = frozenset(
    {"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication"}
)
_PASS_THROUGH |= {"unary", "member", "primary", "paren_expr"}
_SYMBOLS = {
    "relation_eq": "==",
    "relation_lt": "<",
    "relation_le": "<=",
    "relation_gt": ">",
    "relation_ge": ">=",
}
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_MIRRORED = {"==": "==", "<": ">", "<=": ">=", ">": "<", ">=": "<="}  # `1 < x` is `x > 1`
_SLACK = 1e-9  # relative: far above a double's rounding (2**-53), far below a search's intent
_PLAIN_TEXT = re.compile(r"[A-Za-z0-9 _\-./:@#]*")
_NO_LITERAL = object()


@functools.lru_cache(maxsize=256)  # a live search asks again every second
def prefilter(source: str) -> str | None:
    """The SQL/JSON path predicate over a run's event (``{id, name, data, ts, v}``) that keeps
    every event ``source`` matches; None when nothing of it can be translated (or it does not
    compile: the search then says why)."""
    try:
        tree = _ENV.compile(source)
    except Exception:  # an invalid expression: Expression reports it
        return None
    return _translate(tree)


def _translate(node: Any) -> str | None:
    """The predicate of a subtree; None: it keeps every event."""
    if not isinstance(node, lark.Tree):
        return None
    if node.data in _PASS_THROUGH and len(node.children) == 1:
        return _translate(node.children[0])
    translate = _COMBINED.get(node.data)
    return None if translate is None else translate(node.children)


def _either(children: list[Any]) -> str | None:
    """``a || b``: both sides must be translated (an untranslated side keeps every event)."""
    if len(children) != 2:
        return None
    left, right = _translate(children[0]), _translate(children[1])
    return None if left is None or right is None else f"({left} || {right})"


def _both(children: list[Any]) -> str | None:
    """``a && b``: what is translated of either side."""
    if len(children) != 2:
        return None
    parts = [p for p in (_translate(children[0]), _translate(children[1])) if p is not None]
    return f"({' && '.join(parts)})" if parts else None


def _related(children: list[Any]) -> str | None:
    return _relation(children[0], children[1]) if len(children) == 2 else None


def _relation(head: Any, right: Any) -> str | None:
    """``left <op> right``, where ``head`` is ``relation_<op>`` holding ``left``."""
    if not isinstance(head, lark.Tree) or len(head.children) != 1:
        return None
    left = head.children[0]
    if head.data == "relation_in":
        return _within(left, right)
    if head.data not in _SYMBOLS:
        return None
    symbol = _SYMBOLS[head.data]
    path, value = _path(left), _literal(right)
    if path is None:  # a literal on the left: `100 < event.data.total`
        path, value = _path(right), _literal(left)
        return None if path is None else _compare(path, _MIRRORED[symbol], value)
    return _compare(path, symbol, value)


def _compare(path: str, symbol: str, value: Any) -> str | None:
    """``path <symbol> value`` for a string (``==`` only), a number or a boolean."""
    if isinstance(value, str):
        return f"{path} == {_string(value)}" if symbol == "==" else None
    if value is _NO_LITERAL or value is None or not isinstance(value, int | float):
        return None
    number = float(value)
    slack = max(abs(number), 1.0) * _SLACK
    low, high = _number(number - slack), _number(number + slack)
    ranges = {
        "==": f"{path} >= {low} && {path} <= {high}",
        "<": f"{path} < {high}",
        "<=": f"{path} <= {high}",
        ">": f"{path} > {low}",
        ">=": f"{path} >= {low}",
    }
    # CEL compares a boolean with a number as 0 or 1 (Python's bool is an int).
    compare = _OPERATORS[symbol]
    flags = [f"{path} == {str(flag).lower()}" for flag in (False, True) if compare(flag, number)]
    return "(" + " || ".join([f"({ranges[symbol]})", *flags]) + ")"


def _within(left: Any, right: Any) -> str | None:
    """``event.<path> in [a, b, ...]``: equal to one of them."""
    path, items = _path(left), _list(right)
    if path is None or items is None or not items:
        return None
    parts = [_compare(path, "==", item) for item in items]
    if any(part is None for part in parts):
        return None
    return "(" + " || ".join(str(part) for part in parts) + ")"


def _method(children: list[Any]) -> str | None:
    """``event.<path>.startsWith("...")`` (and contains, endsWith) on plain text."""
    if len(children) != 3:
        return None
    path, name, arguments = _path(children[0]), str(children[1]), children[2]
    if path is None or not isinstance(arguments, lark.Tree) or len(arguments.children) != 1:
        return None
    text = _literal(arguments.children[0])
    if not isinstance(text, str):
        return None
    if name == "startsWith":
        return f"{path} starts with {_string(text)}"
    if name in ("contains", "endsWith") and _PLAIN_TEXT.fullmatch(text):
        pattern = re.sub(r"([^A-Za-z0-9 ])", r"\\\1", text) + ("$" if name == "endsWith" else "")
        found = f"{path} like_regex {_string(pattern)}"
        # CEL's contains() also asks a map for a key (a list for an item: like_regex sees those)
        return f"({found} || exists({path}.{_string(text)}))" if name == "contains" else found
    return None


def _has(children: list[Any]) -> str | None:
    """``has(event.<path>)``: the field is there (even when null)."""
    if len(children) != 2 or str(children[0]) != "has":
        return None
    arguments = children[1]
    if not isinstance(arguments, lark.Tree) or len(arguments.children) != 1:
        return None
    path = _path(arguments.children[0])
    return None if path is None else f"exists({path})"


def _path(node: Any) -> str | None:
    """``event.a.b["c"]`` as ``$."a"."b"."c"``; None for anything else."""
    keys: list[str] = []
    while isinstance(node, lark.Tree):
        if node.data in _PASS_THROUGH and len(node.children) == 1:
            node = node.children[0]
        elif node.data == "member_dot" and len(node.children) == 2:
            keys.append(str(node.children[1]))
            node = node.children[0]
        elif node.data == "member_index" and len(node.children) == 2:
            key = _literal(node.children[1])
            if not isinstance(key, str):
                return None
            keys.append(key)
            node = node.children[0]
        elif node.data == "ident" and len(node.children) == 1:
            if str(node.children[0]) != "event" or not keys:
                return None
            return "$" + "".join("." + _string(key) for key in reversed(keys))
        else:
            return None
    return None


def _literal(node: Any) -> Any:
    """A literal's value (a string, number, boolean or None); ``_NO_LITERAL`` otherwise."""
    while isinstance(node, lark.Tree):
        if node.data in _PASS_THROUGH and len(node.children) == 1:
            node = node.children[0]
        elif node.data == "literal" and len(node.children) == 1:
            return _token_value(str(node.children[0]))
        else:
            return _NO_LITERAL
    return _NO_LITERAL


def _token_value(token: str) -> Any:
    """A CEL literal token's value; ``_NO_LITERAL`` for forms not taken (bytes, raw or
    escaped strings, triple quotes)."""
    if token in ("true", "false"):
        return token == "true"
    if token == "null":
        return None
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        inner = token[1:-1]
        if "\\" in inner or token[0] in inner or inner.startswith(token[0] * 2):
            return _NO_LITERAL
        return inner
    try:
        number = token[:-1] if token[-1:] in ("u", "U") else token
        return int(number, 0) if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", number) else float(number)
    except ValueError:
        return _NO_LITERAL


def _list(node: Any) -> list[Any] | None:
    """A list literal's items when every one is a literal."""
    while isinstance(node, lark.Tree) and node.data in _PASS_THROUGH and len(node.children) == 1:
        node = node.children[0]
    if not isinstance(node, lark.Tree) or node.data != "list_lit":
        return None
    if not node.children or node.children[0] is None:
        return []
    items = [_literal(child) for child in node.children[0].children]
    return None if any(item is _NO_LITERAL for item in items) else items


_COMBINED: dict[str, Callable[[list[Any]], str | None]] = {
    "conditionalor": _either,
    "conditionaland": _both,
    "relation": _related,
    "member_dot_arg": _method,
    "ident_arg": _has,
}


def _string(text: str) -> str:
    """A SQL/JSON path string literal."""
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    """A SQL/JSON path numeric literal (plain decimal digits: no exponent)."""
    return format(Decimal(repr(value)), "f")
