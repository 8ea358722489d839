"""CEL expressions over events, compiled once at registration.

Behaviour matches what users of Inngest's expressions expect, where cel-python differs:

* numbers compare across int and double (``event.data.total > 100`` with ``total = 120.5``);
* a missing field is ``null`` rather than an error, and so is any field of it (``has()``
  still tells whether a field is there);
* the candidate event of a wait or a cancel is called ``async``;
* an integer wider than CEL's 64 bits is a double.

Function names and argument counts are checked at compilation (``nope(1)`` or ``size(a, b)``
fail registration rather than never matching). An expression that fails while evaluating (a
type error, a field of ``null``) does not match.
"""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Callable, Mapping
from typing import Any

import celpy
import lark
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError, Evaluator

from .errors import ExpressionError

_NUMBERS = (celtypes.IntType, celtypes.UintType, celtypes.DoubleType)


def _numeric_aware(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], Any]:
    """Wraps a CEL comparison so ints and doubles compare by value, and null compares by ``==``."""

    def compare(a: Any, b: Any) -> Any:
        if isinstance(a, CELEvalError):
            return a
        if isinstance(b, CELEvalError):
            return b
        if isinstance(a, _NUMBERS) and isinstance(b, _NUMBERS):
            return celtypes.BoolType(op(float(a), float(b)))
        if a is None or b is None:
            if op in (operator.eq, operator.ne):
                return celtypes.BoolType(op(a, b))
            return celtypes.BoolType(False)  # null > 3 is false, not an error
        return celtypes.BoolType(bool(op(a, b)))

    return compare


_FUNCTIONS = {
    "_<_": _numeric_aware(operator.lt),
    "_<=_": _numeric_aware(operator.le),
    "_>_": _numeric_aware(operator.gt),
    "_>=_": _numeric_aware(operator.ge),
    "_==_": _numeric_aware(operator.eq),
    "_!=_": _numeric_aware(operator.ne),
}


class _NullingEvaluator(Evaluator):
    """An evaluator in which ``map.missing`` and ``null.field`` are null, except in ``has()``."""

    _in_has = False

    def member_dot(self, tree: lark.Tree[Any]) -> Any:
        result = super().member_dot(tree)
        if isinstance(result, CELEvalError) and not self._in_has:
            member = self.visit(tree.children[0])
            if member is None or isinstance(member, celtypes.MapType):
                return None
        return result

    def macro_has_eval(self, exprlist: lark.Tree[Any]) -> Any:
        self._in_has = True
        try:
            return super().macro_has_eval(exprlist)
        finally:
            self._in_has = False


class _Runner(celpy.InterpretedRunner):
    def evaluate(self, context: Mapping[str, Any]) -> Any:
        evaluator = _NullingEvaluator(ast=self.ast, activation=self.new_activation())
        return evaluator.evaluate(context)


# CEL's parser and evaluator recurse deeply: cel-python sets the interpreter's recursion limit to
# 2500 whenever it builds an environment. Raised here, at import, when the environment was built
# then; building it later must not move a process-wide setting at some moment of the run (a
# hypothesis test, for one, fails when the limit moved during it), nor lower a higher one.
_CEL_RECURSION_LIMIT = 2500
sys.setrecursionlimit(max(sys.getrecursionlimit(), _CEL_RECURSION_LIMIT))


@functools.cache
def _environment() -> celpy.Environment:
    """The CEL environment, built at the first expression compiled rather than at import: its
    parser takes a seventh of a second to build, which every `engine` command paid."""
    limit = sys.getrecursionlimit()
    environment = celpy.Environment(runner_class=_Runner)
    sys.setrecursionlimit(limit)  # whatever cel-python set: the process keeps its own
    return environment


# The calls CEL (as cel-python evaluates it) knows, and how many arguments each takes: anything
# else would compile and then fail at every evaluation, so it is refused at registration.
_CONVERSIONS = ("int", "uint", "double", "string", "bytes", "bool", "duration", "timestamp")
_GLOBAL_CALLS: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(_CONVERSIONS, (1,)),
    "has": (1,),
    "dyn": (1,),
    "size": (1,),
    "type": (1,),
    "matches": (2,),
    "contains": (2,),
    "startsWith": (2,),
    "endsWith": (2,),
}
_TIME_PARTS = (
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getFullYear",
    "getMonth",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
)
_METHOD_CALLS: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(_TIME_PARTS, (0, 1)),
    "size": (0,),
    "contains": (1,),
    "startsWith": (1,),
    "endsWith": (1,),
    "matches": (1,),
    "all": (2,),
    "exists": (2,),
    "exists_one": (2,),
    "filter": (2,),
    "map": (2, 3),
}


def _check_calls(ast: lark.Tree[Any]) -> None:
    """Raises ValueError naming the first call to an unknown function or with a wrong count."""
    for node in ast.iter_subtrees():
        if node.data == "ident_arg":
            name, arguments, known = node.children[0], node.children[1:], _GLOBAL_CALLS
        elif node.data == "member_dot_arg":
            name, arguments, known = node.children[1], node.children[2:], _METHOD_CALLS
        else:
            continue
        count = len(arguments[0].children) if arguments and arguments[0] is not None else 0
        call = f"{name}()" if node.data == "ident_arg" else f".{name}()"
        if str(name) not in known:
            raise ValueError(f"unknown function {call}; known: {', '.join(sorted(known))}")
        if count not in known[str(name)]:
            expected = " or ".join(map(str, known[str(name)]))
            raise ValueError(f"{call} takes {expected} argument(s), got {count}")


class Expression:
    """A compiled CEL expression.

    Args:
        source: the expression text.
        what: names the option in error messages (``"trigger 'order/created' expression"``).

    Raises:
        ExpressionError: the expression does not compile; the message points at the place.
    """

    def __init__(self, source: str, *, what: str = "expression") -> None:
        if not isinstance(source, str) or not source.strip():
            raise ExpressionError(f"{what}: expected a CEL expression, got {source!r}")
        self.source = source
        environment = _environment()
        try:
            ast = environment.compile(source)
            _check_calls(ast)
            self._program = environment.program(ast, functions=_FUNCTIONS)
        except Exception as exc:
            detail = str(exc).rstrip()
            raise ExpressionError(f"{what}: invalid expression {source!r}:\n{detail}") from None

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """Evaluates to a plain Python value; raises :class:`ExpressionError` when it fails."""
        activation = {name: _to_cel(value) for name, value in variables.items()}
        try:
            result = self._program.evaluate(activation)
        except Exception as exc:
            raise ExpressionError(f"expression {self.source!r} failed: {exc}") from exc
        if isinstance(result, CELEvalError):
            raise ExpressionError(f"expression {self.source!r} failed: {result.args[0]}")
        return _to_python(result)

    def matches(self, variables: Mapping[str, Any]) -> bool:
        """True when the expression evaluates to true; an evaluation error does not match."""
        try:
            return self.evaluate(variables) is True
        except ExpressionError:
            return False

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def _to_cel(value: Any) -> Any:
    """A JSON value as CEL values. CEL's ints have 64 bits: an event may hold wider ones (up to
    a double's range, see engine.check_event), which then compare as doubles, as every number
    does in Inngest's expressions, instead of failing the conversion."""
    try:
        return json_to_cel(value)
    except ValueError:  # "overflow": rare, so the walk below is paid only then
        return json_to_cel(_wide_ints_as_doubles(value))


def _wide_ints_as_doubles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _wide_ints_as_doubles(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wide_ints_as_doubles(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return float(value)
    return value


_SCALARS: tuple[tuple[type, type], ...] = (
    (celtypes.BoolType, bool),
    (celtypes.IntType, int),
    (celtypes.UintType, int),
    (celtypes.DoubleType, float),
    (celtypes.StringType, str),
)


def _to_python(value: Any) -> Any:
    for cel_type, python_type in _SCALARS:
        if isinstance(value, cel_type):
            return python_type(value)
    if isinstance(value, celtypes.MapType):
        return {str(k): _to_python(v) for k, v in value.items()}
    if isinstance(value, celtypes.ListType):
        return [_to_python(v) for v in value]
    return value
