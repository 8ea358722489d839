"""The search's prefilter (engine.web.prefilter) never drops a run the expression matches: over
hundreds of generated expressions and dozens of events, every event CEL matches is kept by the
SQL/JSON path predicate PostgreSQL evaluates; and it does drop runs, so a page evaluates fewer."""

from __future__ import annotations

import json
import random
from typing import Any

import asyncpg
import pytest

from engine.expressions import Expression
from engine.web.prefilter import prefilter

SEED = 15
PATHS = [
    "event.data.n",
    "event.data.s",
    "event.data.flag",
    "event.data.tags",
    "event.data.obj.x",
    'event.data["odd key"]',
    "event.data.missing",
    "event.name",
]
LITERALS = [
    "0",
    "1",
    "-1",
    "2",
    "2.5",
    "100",
    "1e3",
    "9007199254740993",
    "true",
    "false",
    "null",
    '"FR"',
    '"fr"',
    '"shop/a"',
    '"a.b"',
    '"é"',
    '""',
    "'1'",
    "3u",
]
VALUES: list[Any] = [
    0,
    1,
    -1,
    2,
    2.5,
    2.5000000001,
    100,
    1000.0,
    9007199254740992,
    2**70,
    0.1,
    True,
    False,
    None,
    "FR",
    "fr",
    "1",
    "shop/a",
    "shop/ab",
    "xa.by",
    "a.b",
    "é",
    "",
    [],
    ["FR", "DE"],
    [1, 2],
    {"x": 1},
    {"FR": 1},
]
NAMES = ["shop/a", "shop/b", "ops/x", "FR", "a.b"]
TEXTS = ['"shop/"', '"a.b"', '"FR"', '""', '"b"', '"x"', '"é"']


def events(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Events whose data hold every kind of value at the paths the expressions use, or not."""
    made = []
    for i in range(count):
        data: dict[str, Any] = {}
        for key in ("n", "s", "flag", "tags", "odd key"):
            if rng.random() < 0.8:
                data[key] = rng.choice(VALUES)
        if rng.random() < 0.7:
            data["obj"] = rng.choice([{"x": rng.choice(VALUES)}, rng.choice(VALUES)])
        made.append({"id": f"e{i}", "name": rng.choice(NAMES), "data": data, "ts": 0, "v": None})
    return made


def atom(rng: random.Random) -> str:
    """One comparison, membership, method call or has()."""
    path = rng.choice(PATHS)
    kind = rng.randrange(6)
    if kind == 0:
        op = rng.choice(["==", "!=", "<", "<=", ">", ">="])
        return f"{path} {op} {rng.choice(LITERALS)}"
    if kind == 1:
        return f"{rng.choice(LITERALS)} {rng.choice(['<', '>=', '=='])} {path}"
    if kind == 2:
        items = ", ".join(rng.sample(LITERALS, rng.randrange(1, 4)))
        return f"{path} in [{items}]"
    if kind == 3:
        method = rng.choice(["startsWith", "contains", "endsWith"])
        return f"{path}.{method}({rng.choice(TEXTS)})"
    if kind == 4:
        return f"has({path})"
    return f"{rng.choice(LITERALS)} in {path}"


def expression(rng: random.Random, depth: int = 0) -> str:
    """Atoms combined with &&, ||, ! and parentheses."""
    if depth >= 3 or rng.random() < 0.4:
        return atom(rng)
    roll = rng.random()
    if roll < 0.1:
        return f"!({expression(rng, depth + 1)})"
    joiner = " && " if roll < 0.6 else " || "
    text = joiner.join(expression(rng, depth + 1) for _ in range(rng.randrange(2, 4)))
    return f"({text})" if rng.random() < 0.5 else text


async def kept(sql: asyncpg.Connection, texts: list[str], path: str) -> set[int]:
    rows = await sql.fetch(
        "SELECT i FROM unnest($1::text[]) WITH ORDINALITY AS t(ev, i)"
        " WHERE ev::jsonb @@ $2::jsonpath",
        texts,
        path,
    )
    return {row["i"] - 1 for row in rows}


async def test_the_prefilter_keeps_every_event_the_expression_matches(
    sql: asyncpg.Connection,
) -> None:
    """200 generated expressions over 80 events (CEL costs about a millisecond an event): CEL's
    matches are a subset of the events the prefilter keeps, for each; most expressions
    translate, and the prefilter drops events."""
    rng = random.Random(SEED)
    sample = events(rng, 80)
    texts = [json.dumps(e) for e in sample]
    translated = dropped = 0
    for _ in range(200):
        source = expression(rng)
        path = prefilter(source)
        if path is None:
            continue
        translated += 1
        check = Expression(source, what="search")
        matched = {i for i, e in enumerate(sample) if check.matches({"event": e})}
        try:
            survivors = await kept(sql, texts, path)
        except asyncpg.PostgresError as error:
            pytest.fail(f"{source!r} -> {path!r}: {error}")
        assert matched <= survivors, (source, path, sorted(matched - survivors)[:5])
        dropped += len(sample) - len(survivors)
    assert translated > 100 and dropped > 0.3 * translated * len(sample), (translated, dropped)


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ('event.name == "shop/a"', '$."name" == "shop/a"'),
        ('event.data.s.startsWith("shop/")', '$."data"."s" starts with "shop/"'),
        ("has(event.data.a)", 'exists($."data"."a")'),
        ("event.data.n != 1", None),
        ("!(event.data.n == 1)", None),
        ("event.data.n == null", None),
        ('event.data.s > "a"', None),
        ("event.data.n == 1 || event.data.n != 2", None),
        ("event.data.n > 1 ? true : false", None),
        ("async.data.n == 1", None),
        ("event.data.n >", None),
    ],
)
def test_what_is_translated_and_what_is_left_to_cel(source: str, path: str | None) -> None:
    """Translated: equality of strings, starts with, has(); left to CEL (None): negations,
    null, ordering of strings, an || with an untranslated side, ternaries, other variables,
    and what does not compile."""
    assert prefilter(source) == path


def test_an_and_keeps_what_it_can_translate() -> None:
    assert prefilter('event.data.n != 1 && event.name == "x"') == '($."name" == "x")'
