"""Replay holds under any interleaving: random programs of steps, run through a real worker.

Hypothesis generates programs: trees of sequential and ``asyncio.gather``-ed groups of steps,
with loops that repeat one step id, durable sleeps, steps that fail a few times before they
succeed, waits for events (sent by the test right after the trigger: a wait sees events that
arrived after the run's trigger) and invokes of a child function, at random places. Each program
runs in a real worker that is stopped and replaced part way through; it must complete with the
output of a plain in-memory evaluation of the program, every step body running once per attempt
(a failing step runs its failures plus one), and every ``ctx.logger`` line outside steps (one
after each leaf) emitted: once over the run's executions in a sequential program, at least once
where parallel branches end with lines after their last step (see docs/concepts.md).

A short profile runs with the suite; ``REPLAY_EXAMPLES=200 pytest tests/test_replay_property.py``
runs a longer one.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from conftest import TEMPLATE, with_database
from helpers import FAST, eventually
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from engine import Checkpointing, Context, Engine, Event, RunStatus, TriggerEvent

EXAMPLES = int(os.environ.get("REPLAY_EXAMPLES", "12"))
_apps = itertools.count()

# A program is a tree: ("seq" | "par", [children]) or a leaf:
# ("step", id, failures) | ("loop", id, times) | ("sleep", id) | ("wait", id) | ("invoke", id).
Node = tuple[Any, ...]

_leaves = st.one_of(
    st.tuples(st.just("step"), st.sampled_from([0, 0, 0, 1, 2])),
    st.tuples(st.just("loop"), st.integers(min_value=2, max_value=3)),
    st.tuples(st.just("sleep")),
    st.tuples(st.just("wait")),
    st.tuples(st.just("invoke")),
)
_trees = st.recursive(
    _leaves,
    lambda children: st.tuples(
        st.sampled_from(["seq", "par"]), st.lists(children, min_size=1, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def programs(draw: st.DrawFn) -> Node:
    """A program with a unique id on each leaf (``n0``, ``n1``... in source order)."""
    body = draw(st.lists(_trees, min_size=1, max_size=4))
    ids = itertools.count()

    def named(node: Node) -> Node:
        if node[0] in ("seq", "par"):
            return (node[0], [named(child) for child in node[1]])
        return (node[0], f"n{next(ids)}", *node[1:])

    return named(("seq", body))


def expected(node: Node) -> Any:
    """The program's output, evaluated in memory."""
    kind = node[0]
    if kind in ("seq", "par"):
        return [expected(child) for child in node[1]]
    step_id = node[1]
    return {
        "step": lambda: step_id,
        "loop": lambda: [f"{step_id}#{i}" for i in range(node[2])],
        "sleep": lambda: None,
        "wait": lambda: f"event for {step_id}",
        "invoke": lambda: f"{step_id} invoked",
    }[kind]()


def leaves(node: Node) -> Iterator[Node]:
    if node[0] in ("seq", "par"):
        for child in node[1]:
            yield from leaves(child)
    else:
        yield node


def expected_calls(program: Node) -> Counter[str]:
    """How many times each step body runs: once, plus once per planned failure."""
    calls: Counter[str] = Counter()
    for leaf in leaves(program):
        if leaf[0] == "step":
            calls[leaf[1]] = leaf[2] + 1
        elif leaf[0] == "loop":
            for i in range(leaf[2]):
                calls[f"{leaf[1]}#{i}"] = 1
    return calls


@dataclass
class Interpreter:
    """Runs a program with ``ctx.step``, counting the calls of every step body."""

    ctx: Context
    child: Any
    calls: Counter[str] = field(default_factory=Counter)
    key: str = ""

    async def run(self, node: Node) -> Any:
        kind = node[0]
        if kind == "seq":
            return [await self.run(child) for child in node[1]]
        if kind == "par":
            return list(await asyncio.gather(*(self.run(child) for child in node[1])))
        result = await getattr(self, kind)(*node[1:])
        self.ctx.logger.info("prop.after", leaf=node[1])  # outside steps: once over the run
        return result

    def body(self, tag: str, failures: int) -> str:
        self.calls[tag] += 1
        if self.calls[tag] <= failures:
            raise RuntimeError(f"{tag} fails (call {self.calls[tag]})")
        return tag

    async def step(self, step_id: str, failures: int) -> Any:
        return await self.ctx.step.run(step_id, self.body, step_id, failures)

    async def loop(self, step_id: str, times: int) -> Any:
        return [
            await self.ctx.step.run(step_id, self.body, f"{step_id}#{i}", 0) for i in range(times)
        ]

    async def sleep(self, step_id: str) -> None:
        await self.ctx.step.sleep(step_id, "2ms")

    async def wait(self, step_id: str) -> Any:
        event = await self.ctx.step.wait_for_event(
            step_id, event=f"prop/{self.key}/{step_id}", timeout="1h", match="data.key"
        )
        assert event is not None
        return event.data["value"]

    async def invoke(self, step_id: str) -> Any:
        return await self.ctx.step.invoke(step_id, function=self.child, data={"x": step_id})


@pytest.fixture(scope="module")
def replay_database(server_url: str) -> Iterator[str]:
    """One database for all examples (each example is its own app)."""
    name = f"engine_replay_property_{os.getpid()}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
    yield with_database(server_url, name)
    asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.mark.timeout(max(120, EXAMPLES * 8))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=programs(), restart_after=st.integers(min_value=0, max_value=12))
# Programs that found defects, run first every time:
@example(  # a step completing while another branch's sleep released the run ran twice
    program=("seq", [("sleep", "n0"), ("loop", "n1", 3), ("sleep", "n2")]), restart_after=0
)
@example(  # the tail's count of logged lines hid a line after a parallel branch's sleep
    program=("seq", [("par", [("step", "n0", 0), ("sleep", "n1"), ("step", "n2", 0)])]),
    restart_after=0,
)
@example(  # the count of an earlier tail, kept by suspend_run, hid the lines of a later one
    program=(
        "seq",
        [
            (
                "par",
                [
                    ("invoke", "n0"),
                    ("seq", [("wait", "n1")]),
                    (
                        "seq",
                        [("loop", "n2", 3), ("invoke", "n3"), ("wait", "n4"), ("invoke", "n5")],
                    ),
                    ("par", [("wait", "n6"), ("invoke", "n7"), ("invoke", "n8")]),
                ],
            )
        ],
    ),
    restart_after=10,
)
def test_random_programs_replay_to_their_in_memory_result(
    replay_database: str, program: Node, restart_after: int
) -> None:
    """Every program completes with its in-memory output; each step body runs once per attempt,
    across suspensions, retries and a worker replaced part way through."""
    asyncio.run(_check(replay_database, program, restart_after))


@pytest.mark.timeout(max(120, EXAMPLES * 8))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=programs(), restart_after=st.integers(min_value=0, max_value=12))
def test_random_programs_replay_with_buffered_checkpoints(
    replay_database: str, program: Node, restart_after: int
) -> None:
    """The same with buffered checkpoints (three steps, or 50 ms): a worker stopped
    gracefully commits what it buffered, so each step body still runs once per attempt."""
    buffered = Checkpointing(buffered_steps=3, max_interval="50ms")
    asyncio.run(_check(replay_database, program, restart_after, buffered))


async def _check(
    database_url: str,
    program: Node,
    restart_after: int,
    checkpointing: Checkpointing | None = None,
) -> None:
    app = Engine(f"replay-{next(_apps)}", database_url, backoff=FAST)
    key = app.app_id

    @app.create_function("child", trigger=TriggerEvent(f"prop/{key}/never"))
    async def child(ctx: Context) -> Any:
        return f"{ctx.event.data['x']} invoked"

    calls: Counter[str] = Counter()

    @app.create_function(
        "program", trigger=TriggerEvent(f"prop/{key}/start"), checkpointing=checkpointing
    )
    async def run_program(ctx: Context) -> Any:
        return await Interpreter(ctx, child, calls, key).run(program)

    try:
        with capture_logs() as logs:
            run_id = await _run_with_a_restart(app, program, restart_after)
        run = await app.get_run(run_id)
    finally:
        await app.close()
    assert run.status is RunStatus.COMPLETED, (run.error, program)
    assert run.output == expected(program), program
    assert calls == expected_calls(program), program
    logged = Counter(e["leaf"] for e in logs if e["event"] == "prop.after")
    if _sequential(program):
        assert logged == Counter(leaf[1] for leaf in leaves(program)), program
    else:  # lines after the last step of parallel branches: at least once (docs/concepts.md)
        assert set(logged) == {leaf[1] for leaf in leaves(program)}, program


def _sequential(node: Node) -> bool:
    return node[0] != "par" and (node[0] != "seq" or all(map(_sequential, node[1])))


async def _run_with_a_restart(app: Engine, program: Node, restart_after: int) -> str:
    """Runs the program in a worker that another replaces once ``restart_after`` steps are
    recorded (or the run ended); returns the run's id once it ended."""
    key = app.app_id
    async with app.worker(poll_interval="50ms"):
        [event_id] = await app.send(Event(name=f"prop/{key}/start", data={"key": key}))
        run_id = await _run_of(app, event_id)
        answers = [
            Event(name=f"prop/{key}/{leaf[1]}", data={"key": key, "value": f"event for {leaf[1]}"})
            for leaf in leaves(program)
            if leaf[0] == "wait"
        ]
        if answers:
            await app.send(answers)
        await eventually(lambda: _progressed(app, run_id, restart_after), timeout=30)
    async with app.worker(poll_interval="50ms"):  # a new worker takes the run over
        await app.wait_for_run(run_id, timeout=60)
    return run_id


async def _run_of(app: Engine, event_id: str) -> str:
    async def runs() -> Any:
        return await app.runs_for_event(event_id)

    [run] = await eventually(runs)
    return str(run.run_id)


async def _progressed(app: Engine, run_id: str, steps: int) -> bool:
    run = await app.get_run(run_id)
    return run.status.value in ("COMPLETED", "FAILED") or len(run.steps) >= steps
