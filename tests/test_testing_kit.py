"""The testing kit (docs/testing.md): run_function, and time control for whole-system tests.

These tests are the examples docs/testing.md shows: each uses the pytest plugin's fixtures
(``engine_database_url``, ``engine_app``) as a user's test would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import eventually, status_is

from engine import (
    Context,
    Debounce,
    Engine,
    EngineError,
    Event,
    RunStatus,
    Throttle,
    TriggerCron,
    TriggerEvent,
)
from engine.testing import _Driver, advance_clock, run_function

# -- the app under test: declared once, as in a user's code ----------------------------------------
shop = Engine("shop")
charged: list[str] = []


def charge_card(order_id: str) -> dict[str, Any]:
    """The real side effect, which a unit test must not perform."""
    charged.append(order_id)
    return {"ok": True, "charge_id": f"ch-{order_id}"}


@shop.create_function("bill", trigger=TriggerEvent("shop/bill"))
async def bill(ctx: Context) -> str:
    await ctx.step.sleep("settle", "3d")
    return f"billed {ctx.event.data['order_id']}"


@shop.create_function("checkout", trigger=TriggerEvent("shop/checkout"), retries=2)
async def checkout(ctx: Context) -> dict[str, Any]:
    order_id = ctx.event.data["order_id"]
    charge = await ctx.step.run("charge", charge_card, order_id)
    await ctx.step.sleep("cool-off", "1h")
    paid = await ctx.step.wait_for_event(
        "wait-payment", event="shop/paid", match="data.order_id", timeout="1d"
    )
    if paid is None:
        return {"charge": charge, "paid": None}
    receipt = await ctx.step.invoke("bill", function=bill, data={"order_id": order_id})
    return {"charge": charge, "paid": paid.data["amount"], "receipt": receipt}


# -- run_function ----------------------------------------------------------------------------------
async def test_run_function_mocks_steps_and_waits_and_skips_sleeps(
    engine_database_url: str,
) -> None:
    """The charge is mocked (charge_card never runs), the payment arrives at once (whatever its
    order id: a mocked wait ignores match), the sleeps pass through durable time, and the child
    run of the invoke runs for real."""
    charged.clear()
    run = await run_function(
        checkout,
        Event(name="shop/checkout", data={"order_id": "A-1"}),
        steps={"charge": {"ok": True, "charge_id": "mock"}},
        events={"wait-payment": Event(name="shop/paid", data={"order_id": "other", "amount": 9})},
        functions=[bill],
    )
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == {
        "charge": {"ok": True, "charge_id": "mock"},
        "paid": 9,
        "receipt": "billed A-1",
    }
    assert charged == []
    assert [(s.step_id, s.kind, s.status) for s in run.steps] == [
        ("charge", "run", "COMPLETED"),
        ("cool-off", "sleep", "COMPLETED"),
        ("wait-payment", "wait", "COMPLETED"),
        ("bill", "invoke", "COMPLETED"),
    ]


async def test_run_function_times_a_wait_out_with_none(engine_database_url: str) -> None:
    run = await run_function(
        checkout,
        Event(name="shop/checkout", data={"order_id": "A-2"}),
        steps={"charge": {"ok": True}},
        events={"wait-payment": None},
    )
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"charge": {"ok": True}, "paid": None}
    assert run.steps[-1].output is None


async def test_run_function_retries_a_mocked_failure_as_production_would(
    engine_database_url: str,
) -> None:
    """An exception as a step's mock is raised by each attempt: the step retries after the
    default backoff (15 s and more, passed through durable time) and fails for good; the run
    records every attempt."""
    run = await run_function(
        checkout,
        Event(name="shop/checkout", data={"order_id": "A-3"}),
        steps={"charge": ConnectionError("card network down")},
    )
    assert run.status is RunStatus.FAILED
    assert run.error is not None and "card network down" in run.error["message"]
    [charge] = run.steps
    assert charge.attempt_count == 3
    assert [a.outcome for a in charge.attempts] == ["RETRYING", "RETRYING", "FAILED"]


async def test_run_function_refuses_an_event_that_does_not_trigger_the_function(
    database_url: str,
) -> None:
    with pytest.raises(EngineError, match="does not trigger function 'checkout'"):
        await run_function(checkout, Event(name="shop/other"), database_url=database_url)


@shop.create_function("nightly", trigger=TriggerCron("0 3 * * *"))
async def nightly(ctx: Context) -> dict[str, Any]:
    """A cron-only function: no event routes to it."""
    await ctx.step.sleep("settle", "1h")
    return {"event": ctx.event.name, "cron": ctx.event.data["cron"]}


@shop.create_function("refund", trigger=[])
async def refund(ctx: Context) -> str:
    """An invoke-only function: only ctx.step.invoke starts it."""
    amount = await ctx.step.run("refund", lambda: ctx.event.data["amount"])
    return f"refunded {amount}"


async def test_run_function_starts_a_cron_function_with_a_tick(engine_database_url: str) -> None:
    run = await run_function(nightly, Event(name="engine/scheduled.timer"))
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"event": "engine/scheduled.timer", "cron": "0 3 * * *"}
    assert [s.step_id for s in run.steps] == ["settle"]


async def test_run_function_starts_an_invoke_only_function_with_its_data(
    engine_database_url: str,
) -> None:
    run = await run_function(refund, Event(name="engine/function.invoked", data={"amount": 12}))
    assert run.status is RunStatus.COMPLETED
    assert run.output == "refunded 12"


async def test_run_function_refuses_a_tick_for_a_function_without_a_cron(
    engine_database_url: str,
) -> None:
    with pytest.raises(EngineError, match="'checkout' has no cron trigger"):
        await run_function(checkout, Event(name="engine/scheduled.timer"))


async def test_a_direct_start_names_a_registered_function(sql: Any) -> None:
    """The SQL behind a direct start refuses a function no worker registered, as an invoke
    does (EN003), and an event it does not start runs with."""
    with pytest.raises(asyncpg.PostgresError, match="cannot start shop/ghost: no such function"):
        await sql.fetchval(
            "SELECT engine.start_run_directly('shop', 'ghost', 'engine/function.invoked',"
            " '{}', '{}')"
        )
    with pytest.raises(asyncpg.PostgresError, match="not shop/paid"):
        await sql.fetchval(
            "SELECT engine.start_run_directly('shop', 'ghost', 'shop/paid', '{}', '{}')"
        )


def test_run_function_without_a_database_says_how_to_get_one() -> None:
    import asyncio

    with pytest.raises(EngineError, match="engine_database_url fixture"):
        asyncio.run(run_function(checkout, Event(name="shop/checkout")))


# -- time control for whole-system tests -----------------------------------------------------------
async def test_retry_pattern(engine_app: Engine) -> None:
    """A step that fails once retries after its backoff: move durable time past it."""
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("try again")
        return "ok"

    @engine_app.create_function("flaky", trigger=TriggerEvent("go"))
    async def fn(ctx: Context) -> str:
        return await ctx.step.run("flaky", flaky)

    async with engine_app.worker(poll_interval="50ms"):
        [event_id] = await engine_app.send(Event(name="go"))
        [run] = await engine_app.runs_for_event(event_id, at_least=1)
        await eventually(lambda: status_is(engine_app, run.run_id, RunStatus.RETRYING))
        await advance_clock(engine_app, "1h")  # past any default backoff
        run = await engine_app.wait_for_run(run.run_id)
    assert run.status is RunStatus.COMPLETED and len(attempts) == 2


async def test_sleep_pattern(engine_app: Engine) -> None:
    """A three-day sleep ends as soon as durable time has moved three days."""

    @engine_app.create_function("drip", trigger=TriggerEvent("user/signed-up"))
    async def drip(ctx: Context) -> str:
        await ctx.step.sleep("three-days", "3d")
        return "follow-up sent"

    async with engine_app.worker(poll_interval="50ms"):
        [event_id] = await engine_app.send(Event(name="user/signed-up"))
        [run] = await engine_app.runs_for_event(event_id, at_least=1)
        await eventually(lambda: status_is(engine_app, run.run_id, RunStatus.SLEEPING))
        await advance_clock(engine_app, "2d")
        assert (await engine_app.get_run(run.run_id)).status is RunStatus.SLEEPING
        await advance_clock(engine_app, "1d")
        run = await engine_app.wait_for_run(run.run_id)
    assert run.output == "follow-up sent"


async def test_wait_pattern(engine_app: Engine) -> None:
    """A wait resumes with the matching event, or returns None once its timeout passed."""

    @engine_app.create_function("order", trigger=TriggerEvent("shop/order"))
    async def order(ctx: Context) -> Any:
        paid = await ctx.step.wait_for_event(
            "payment", event="shop/paid", match="data.order_id", timeout="1d"
        )
        return None if paid is None else paid.data["amount"]

    async with engine_app.worker(poll_interval="50ms"):
        ids = await engine_app.send(
            [
                Event(name="shop/order", data={"order_id": 1}),
                Event(name="shop/order", data={"order_id": 2}),
            ]
        )
        runs = [(await engine_app.runs_for_event(i, at_least=1))[0].run_id for i in ids]
        for run_id in runs:
            await eventually(lambda run_id=run_id: status_is(engine_app, run_id, RunStatus.WAITING))
        await engine_app.send(Event(name="shop/paid", data={"order_id": 1, "amount": 5}))
        assert (await engine_app.wait_for_run(runs[0])).output == 5
        await advance_clock(engine_app, "1d")
        assert (await engine_app.wait_for_run(runs[1])).output is None


async def test_invoke_pattern(engine_app: Engine) -> None:
    """The parent waits for its child, which sleeps: moving time ends both."""

    @engine_app.create_function("child")
    async def child(ctx: Context) -> int:
        await ctx.step.sleep("later", "1h")
        return int(ctx.event.data["n"]) * 2

    @engine_app.create_function("parent", trigger=TriggerEvent("go"))
    async def parent(ctx: Context) -> int:
        doubled: int = await ctx.step.invoke("double", function=child, data={"n": 21})
        return doubled

    async with engine_app.worker(poll_interval="50ms"):
        [event_id] = await engine_app.send(Event(name="go"))
        [run] = await engine_app.runs_for_event(event_id, at_least=1)
        await eventually(lambda: status_is(engine_app, run.run_id, RunStatus.WAITING))
        child_run = (await engine_app.list_runs("child"))[0]
        await eventually(lambda: status_is(engine_app, child_run.run_id, RunStatus.SLEEPING))
        await advance_clock(engine_app, "1h")
        run = await engine_app.wait_for_run(run.run_id)
    assert run.output == 42


async def test_flow_control_pattern(engine_app: Engine) -> None:
    """Debounce: one run, with the last event, once the quiet period passed in durable time;
    throttle: the run over the limit starts when its turn comes in durable time."""

    @engine_app.create_function(
        "search-index", trigger=TriggerEvent("doc/edited"), debounce=Debounce(period="10m")
    )
    async def index(ctx: Context) -> Any:
        return ctx.event.data["rev"]

    @engine_app.create_function(
        "report", trigger=TriggerEvent("report/asked"), throttle=Throttle(limit=1, period="1h")
    )
    async def report(ctx: Context) -> Any:
        return ctx.event.data["n"]

    async with engine_app.worker(poll_interval="50ms"):
        await engine_app.send([Event(name="doc/edited", data={"rev": r}) for r in (1, 2, 3)])
        # limit 1 per hour, plus a burst of 1: two start at once, the third an hour later
        reports = await engine_app.send(
            [Event(name="report/asked", data={"n": n}) for n in (1, 2, 3)]
        )
        runs = [(await engine_app.runs_for_event(i, at_least=1))[0] for i in reports]
        assert [(await engine_app.wait_for_run(r.run_id)).output for r in runs[:2]] == [1, 2]
        held = await engine_app.get_run(runs[2].run_id)
        assert held.status is RunStatus.QUEUED
        await advance_clock(engine_app, "10m")
        [debounced] = await eventually(lambda: _ended(engine_app, "search-index"))
        assert debounced.output == 3
        await advance_clock(engine_app, "1h")
        assert (await engine_app.wait_for_run(held.run_id)).output == 3


async def _ended(app: Engine, fn_id: str) -> list[Any]:
    return await app.list_runs(fn_id, RunStatus.COMPLETED)


# -- the plugin in a user's project ----------------------------------------------------------------
USER_TESTS = """
from engine import Context, Engine, Event, TriggerEvent
from engine.testing import run_function

app = Engine("user-app")


@app.create_function("greet", trigger=TriggerEvent("user/hello"))
async def greet(ctx: Context) -> str:
    name = await ctx.step.run("lookup", lambda: "from the real lookup")
    await ctx.step.sleep("nap", "7d")
    return f"hello {name}"


async def test_with_the_fixture(engine_database_url):
    run = await run_function(greet, Event(name="user/hello"), steps={"lookup": "ada"})
    assert run.output == "hello ada"
"""

LAZY = """
import sys

def test_the_plugin_imports_nothing_of_the_engine():
    assert "engine" not in sys.modules
"""


def test_the_plugin_in_a_users_project(tmp_path: Path, server_url: str) -> None:
    """Installed, the plugin is active in any project (no conftest): a suite that does not use
    it imports nothing of the engine; one that does gets a fresh database per test."""
    (tmp_path / "test_lazy.py").write_text(textwrap.dedent(LAZY))
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    env = {**os.environ, "TEST_DATABASE_URL": server_url}

    def pytest_in_project(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    lazy = pytest_in_project("test_lazy.py")
    assert lazy.returncode == 0, lazy.stdout + lazy.stderr
    used = pytest_in_project("-o", "asyncio_mode=auto", "test_user.py")
    assert used.returncode == 0, used.stdout + used.stderr
    assert "1 passed" in used.stdout


async def test_a_run_that_ended_since_it_was_read_is_not_reported_stuck(
    engine_database_url: str,
) -> None:
    """The driver decides on the run's status read with the due times, in one snapshot: a run
    read as waiting that ended just after (its invoke resolved and it completed) leaves nothing
    due, and must not be reported as waiting for something nothing will bring."""
    app = Engine("ended", engine_database_url)

    @app.create_function("quick", trigger=TriggerEvent("ended/go"))
    async def quick(ctx: Context) -> str:
        return "done"

    run = await run_function(quick, Event(name="ended/go"))
    assert run.status is RunStatus.COMPLETED
    stale = run.model_copy(
        update={"status": RunStatus.WAITING, "waiting_reason": "resumed by event x"}
    )
    driver = _Driver(app, run.run_id, {})
    try:
        assert await driver._move_time(stale) is False
    finally:
        await app.close()


async def test_time_does_not_move_past_a_mocked_wait_before_its_event_is_sent(
    engine_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver reads the run, sends the mocked event of a wait it shows, then reads the due
    times. A run that reached its wait between the two reads (faster steps made it likelier:
    a CI flake) must get its event before durable time moves past the wait's timeout. Here the
    first read that shows the wait is made stale on purpose."""
    deliver = _Driver._deliver
    stale: list[bool] = []

    async def first_read_stale(self: _Driver, run: Any) -> bool:
        if not stale and any(s.kind == "wait" and s.status == "WAITING" for s in run.steps):
            stale.append(True)
            return False  # as if `run` had been read just before the wait was reached
        return await deliver(self, run)

    monkeypatch.setattr(_Driver, "_deliver", first_read_stale)
    run = await run_function(
        checkout,
        Event(name="shop/checkout", data={"order_id": "A-3"}),
        steps={"charge": {"ok": True}},
        events={"wait-payment": Event(name="shop/paid", data={"order_id": "A-3", "amount": 5})},
        functions=[bill],
    )
    assert stale == [True]
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == {"charge": {"ok": True}, "paid": 5, "receipt": "billed A-3"}
