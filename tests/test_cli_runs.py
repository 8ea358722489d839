"""The real `engine runs`, `engine events` commands on a real database (#14): tables that read
in 80 columns when piped, --json for scripts, pages, and one clear line for every error."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
from conftest import with_database
from helpers import eventually, finished, shop

from engine import Context, Engine, Event, RunStatus, TriggerEvent

# What could make rich draw for a terminal, or at another width, in a CI shell.
_TERMINAL_HINTS = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


def cli(
    *args: str, url: str | None = None, columns: int | None = None, env_url: str | None = None
) -> Any:
    """Runs `engine ARGS [--database-url URL]` as a script would: output piped, no
    $DATABASE_URL but ``env_url`` (and with ``columns``, $COLUMNS set as a terminal's shell
    does)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (*_TERMINAL_HINTS, "DATABASE_URL", "ENGINE_LOG_LEVEL")
    }
    if columns is not None:
        env["COLUMNS"] = str(columns)
    if env_url is not None:
        env["DATABASE_URL"] = env_url
    return subprocess.run(
        [sys.executable, "-m", "engine", *args, *(["--database-url", url] if url else [])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=Path(__file__).parent,
    )


def ok(result: Any) -> str:
    assert result.returncode == 0, result.stderr
    return str(result.stdout)


def rows(table: str) -> list[list[str]]:
    """The rows of a table printed for people (under its header and rule)."""
    return [line.split() for line in table.splitlines()[2:]]


def readable_when_piped(text: str) -> None:
    assert "\x1b[" not in text, "colour codes in piped output"
    assert max(map(len, text.splitlines())) <= 80, text


async def test_runs_list_pages_filters_and_reads_in_80_columns(
    make_engine: Any, database_url: str
) -> None:
    """`engine runs list`: newest first, --limit rows a page, the next page's --cursor said on
    stderr, filters by status (any case), function, event name and time; --json for scripts."""
    app = make_engine("shop")
    shop(app)
    async with app.worker():
        await finished(app, [Event(name="x/pack") for _ in range(3)])
        [failed] = await finished(app, [Event(name="x/bill", data={"fail": True})])
    newest = [run.run_id for run in (await app.list_run_summaries()).runs]
    first = cli("runs", "list", "--limit", "2", url=database_url)
    readable_when_piped(ok(first))
    assert [row[0] for row in rows(first.stdout)] == newest[:2]
    assert rows(first.stdout)[0][1:3] == ["bill", "FAILED"]
    cursor = first.stderr.split("--cursor ")[1].strip()
    second = cli("runs", "list", "--limit", "2", "--cursor", cursor, url=database_url)
    assert [row[0] for row in rows(ok(second))] == newest[2:] and second.stderr == ""
    failures = json.loads(ok(cli("runs", "list", "--status", "failed", "--json", url=database_url)))
    assert [run["run_id"] for run in failures["runs"]] == [failed]
    assert failures["runs"][0]["event_name"] == "x/bill" and failures["cursor"] is None
    chosen = ["--function", "pack", "--event", "x/pack", "--since", "1h", "--json"]
    packs = json.loads(ok(cli("runs", "list", *chosen, url=database_url)))
    assert [run["run_id"] for run in packs["runs"]] == newest[1:]
    wide = ok(cli("runs", "list", url=database_url, columns=140))
    assert wide.splitlines()[0].split() == ["RUN", "FUNCTION", "STATUS", "AGE", "TOOK", "EVENT"]


async def test_runs_show_prints_the_run_for_people_and_as_json(
    make_engine: Any, database_url: str
) -> None:
    """`engine runs show RUN_ID --json` prints RunInfo.model_dump(mode="json"); without --json
    the header and the step table, readable when piped."""
    app = make_engine("shop")

    @app.create_function("two", trigger=TriggerEvent("x/two"))
    async def two(ctx: Context) -> str:
        await ctx.step.run("first", lambda: 1)
        await ctx.step.run("second", lambda: 2)
        return "done"

    async with app.worker():
        [run_id] = await finished(app, [Event(name="x/two")])
    run = await app.get_run(run_id)
    shown = json.loads(ok(cli("runs", "show", run_id, "--json", url=database_url)))
    assert shown == json.loads(json.dumps(run.model_dump(mode="json")))
    assert [step["step_id"] for step in shown["steps"]] == ["first", "second"]
    assert "attempts" in shown["steps"][0] and "pauses" in shown
    table = ok(cli("runs", "show", run_id, url=database_url))
    readable_when_piped(table)
    lines = table.splitlines()
    assert lines[0].split() == ["run", run_id] and lines[1].split() == ["status", "COMPLETED"]
    assert "Steps (2)" in lines
    steps = lines[lines.index("Steps (2)") + 3 :]
    assert [line.split()[:3] for line in steps[:2]] == [
        ["first", "run", "COMPLETED"],
        ["second", "run", "COMPLETED"],
    ]


def one_line_error(result: Any, code: int, message: str) -> None:
    assert (result.returncode, result.stdout) == (code, ""), result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


async def test_every_error_is_one_clear_line_with_its_exit_status(
    server_url: str, database_url: str, tmp_path: Path
) -> None:
    """A database that cannot be reached, one that does not exist, one without the schema, an
    unknown run or event (exit 1), a malformed run id (exit 2): one line each, no traceback."""
    run_id = "0193a4f2-6b1c-7d3e-8f40-5a6b7c8d9e0f"
    nowhere = f"postgresql://postgres@/postgres?host={tmp_path / 'nothing-here'}"
    one_line_error(
        cli("runs", "show", run_id, url=nowhere),
        1,
        f"engine runs show: error: cannot reach the database at {nowhere}",
    )
    missing = with_database(server_url, "no_such_database")
    one_line_error(
        cli("runs", "list", url=missing),
        1,
        f"engine runs list: error: cannot use the database at {missing}: database"
        ' "no_such_database" does not exist',
    )
    bare = with_database(server_url, "postgres")
    one_line_error(cli("events", "list", url=bare), 1, "has no engine schema")
    one_line_error(cli("events", "list", url=bare), 1, "run `engine migrate`")
    one_line_error(
        cli("runs", "show", run_id, url=database_url),
        1,
        f"engine runs show: error: no run {run_id}",
    )
    one_line_error(
        cli("runs", "show", "run-42", url=database_url),
        2,
        "engine runs show: error: 'run-42' is not a run id: run ids are UUIDs",
    )
    one_line_error(
        cli("events", "show", "nope", url=database_url),
        1,
        "engine events show: error: no event nope",
    )


async def test_cancel_and_rerun_commands(make_engine: Any, database_url: str) -> None:
    """`engine runs cancel` cancels a waiting run, says a finished one was already over, and
    fails (1) naming an unknown id after doing the rest; `engine runs rerun --from-step` starts
    a new run that keeps the earlier steps' outputs, and names the steps it could start from
    when given another (2)."""
    app = make_engine("shop")
    calls: list[str] = []

    @app.create_function("hold", trigger=TriggerEvent("x/hold"))
    async def hold(ctx: Context) -> Any:
        first = await ctx.step.run("first", lambda: calls.append("first") or len(calls))
        await ctx.step.run("second", lambda: calls.append("second"))
        if ctx.event.data.get("wait"):
            await ctx.step.wait_for_event("go", event="x/go", timeout="1h")
        return first

    async with app.worker():
        [done] = await finished(app, [Event(name="x/hold")])
        [event_id] = await app.send(Event(name="x/hold", data={"wait": True}))
        [waiting] = await app.runs_for_event(event_id, at_least=1)

        async def is_waiting() -> bool:
            return (await app.get_run(waiting.run_id)).status is RunStatus.WAITING

        await eventually(is_waiting)
        unknown = "0193a4f2-6b1c-7d3e-8f40-5a6b7c8d9e0f"
        cancel = await asyncio.to_thread(
            cli, "runs", "cancel", waiting.run_id, done, unknown, url=database_url
        )
        assert cancel.returncode == 1 and cancel.stderr.strip().endswith(f"no run {unknown}")
        assert cancel.stdout.splitlines() == [
            f"{waiting.run_id}  CANCELLED",
            f"{done}  COMPLETED: already over, nothing to cancel",
        ]
        assert (await app.get_run(waiting.run_id)).status is RunStatus.CANCELLED
        calls.clear()
        rerun = await asyncio.to_thread(
            cli, "runs", "rerun", done, "--from-step", "second", url=database_url
        )
        new_id = ok(rerun).strip()
        again = await app.wait_for_run(new_id)
    assert again.status is RunStatus.COMPLETED and again.output == 1 and calls == ["second"]
    wrong = cli("runs", "rerun", done, "--from-step", "third", url=database_url)
    one_line_error(wrong, 2, f"run {done} has no step 'third'; its steps: first, second")


async def test_events_list_show_and_replay(
    make_engine: Any, database_url: str, sql: asyncpg.Connection
) -> None:
    """`engine events list` newest first; `show` gives the event, its data and its runs;
    `replay` sends a copy (new id, same name and data), prints its id and the runs it started,
    or says no worker routed it in time."""
    app = make_engine("shop")
    shop(app)
    async with app.worker():
        [run_id] = await finished(app, [Event(name="x/bill", id="order-7", data={"total": 12})])
        listed = ok(cli("events", "list", "--name", "x/bill", url=database_url))
        readable_when_piped(listed)
        assert [row[:2] + row[-2:] for row in rows(listed)] == [
            ["order-7", "x/bill", "routed", "1"]
        ]
        shown = json.loads(ok(cli("events", "show", "order-7", "--json", url=database_url)))
        assert (shown["event"]["data"], shown["event"]["status"]) == ({"total": 12}, "routed")
        assert [run["run_id"] for run in shown["runs"]] == [run_id]
        people = ok(cli("events", "show", "order-7", url=database_url))
        assert '"total": 12' in people and run_id in people
        replay = await asyncio.to_thread(cli, "events", "replay", "order-7", url=database_url)
        copy_id = ok(replay).strip()
        assert copy_id != "order-7" and "started 1 run(s): bill " in replay.stderr
    copy = await app.get_event(copy_id)
    assert copy is not None and (copy.name, copy.data, copy.runs) == ("x/bill", {"total": 12}, 1)
    unrouted = cli("events", "replay", "order-7", "--wait", "200ms", url=database_url)
    assert "not routed within 200ms: is a worker running" in unrouted.stderr
    pending = await sql.fetchval("SELECT count(*) FROM engine.event_queue")
    assert pending == 1 and (await app.get_event(unrouted.stdout.strip())) is not None


def test_help_names_the_commands() -> None:
    result = ok(cli("--help"))
    assert "runs" in result and "events" in result and "functions" in result
    replay = ok(cli("events", "replay", "--help"))
    assert "a new id" in replay


async def test_the_database_comes_from_database_url_and_nothing_is_registered(
    database_url: str, tmp_path: Path
) -> None:
    """Without --database-url the commands read $DATABASE_URL (the option wins over it);
    reading registers no function."""
    assert ok(cli("runs", "list", env_url=database_url)) == "No runs.\n"
    nowhere = f"postgresql://postgres@/postgres?host={tmp_path / 'nothing-here'}"
    assert ok(cli("events", "list", url=database_url, env_url=nowhere)) == "No events.\n"
    one_line_error(
        cli("events", "list", env_url=nowhere), 1, f"cannot reach the database at {nowhere}"
    )
    app = Engine("probe", database_url)
    try:
        assert await app.list_functions(all_apps=True) == []
    finally:
        await app.close()


async def test_runs_show_tells_the_story_of_a_retried_step_a_sleep_and_a_wait(
    make_engine: Any, database_url: str
) -> None:
    """A real run through a worker: a step that succeeds on its third attempt, a sleep and a
    wait resumed by an event. `engine runs show --json` has every attempt (times, worker, the
    first two errors) and every pause; the table shows the same, and the timeline a bar for
    each execution, attempt and pause."""
    app = make_engine("shop")
    calls: list[int] = []

    def fetch_user() -> dict[str, str]:
        calls.append(len(calls))
        if len(calls) < 3:
            raise ConnectionError(f"upstream refused (call {len(calls)})")
        return {"email": "ada@example.com"}

    @app.create_function("onboard", trigger=TriggerEvent("user/signed-up"), retries=3)
    async def onboard(ctx: Context) -> Any:
        user = await ctx.step.run("fetch-user", fetch_user)
        await ctx.step.sleep("nap", "100ms")
        approval = await ctx.step.wait_for_event("approval", event="user/approved", timeout="1h")
        return {"user": user, "approved": approval is not None}

    async with app.worker() as worker:
        [event_id] = await app.send(Event(name="user/signed-up", data={"user_id": "u1"}))
        [run] = await app.runs_for_event(event_id, at_least=1)

        async def waiting() -> bool:
            return (await app.get_run(run.run_id)).status is RunStatus.WAITING

        await eventually(waiting, timeout=30)
        [approval_id] = await app.send(Event(name="user/approved", data={"user_id": "u1"}))
        await app.wait_for_run(run.run_id)
    shown = json.loads(ok(cli("runs", "show", run.run_id, "--json", url=database_url)))
    assert shown["status"] == "COMPLETED"
    fetch, nap, approval = shown["steps"]
    assert (fetch["step_id"], fetch["attempt_count"], len(fetch["attempts"])) == (
        "fetch-user",
        3,
        3,
    )
    for number, attempt in enumerate(fetch["attempts"]):
        assert attempt["attempt"] == number and attempt["worker"] == str(worker.owner)
        assert attempt["started_at"] <= attempt["ended_at"]
    messages = [(a["error"] or {}).get("message") for a in fetch["attempts"]]
    assert messages == ["upstream refused (call 1)", "upstream refused (call 2)", None]
    assert [a["outcome"] for a in fetch["attempts"]] == ["RETRYING", "RETRYING", "COMPLETED"]
    kinds = [(p["kind"], p["step_id"], p["ended_by"]) for p in shown["pauses"]]
    assert kinds == [
        ("backoff", "fetch-user", "time"),
        ("backoff", "fetch-user", "time"),
        ("sleep", "nap", "time"),
        ("wait", "approval", "event"),
    ]
    assert shown["pauses"][-1]["event_id"] == approval_id
    assert (nap["kind"], approval["kind"]) == ("sleep", "wait")

    table = ok(cli("runs", "show", run.run_id, url=database_url))
    readable_when_piped(table)
    lines = table.splitlines()
    text = "\n".join(lines)
    assert "Steps (3)" in lines and "Pauses (4)" in lines and "Timeline" in lines
    assert f"Executions ({len(shown['executions'])})" in lines
    assert "ConnectionError:" in text and "refused (call" in text
    attempts = [line.split()[:2] for line in lines if line.startswith("  #")]
    assert attempts == [["#1", "failed"], ["#2", "failed"], ["#3", "completed"]]
    timeline = lines[lines.index("Timeline") + 2 :]
    labels = [line[:28].strip() for line in timeline]
    assert sum(label.startswith("fetch-user #") for label in labels) == 3
    assert any(label.startswith("sleep nap") for label in labels)
    assert any(label.startswith("wait approval") for label in labels)
    assert sum(label.startswith("execution") for label in labels) == len(shown["executions"])


def test_bad_listing_options_are_refused_before_anything_runs() -> None:
    """A cursor of another listing or none at all, a page size out of range, a time that is
    neither ISO 8601 with a zone nor a duration, an unknown status: exit 2, said at once."""
    events_cursor = "ZXZlbnRzfDI"  # what `engine events list` prints
    cases = [
        (("runs", "list", "--cursor", events_cursor), "is not a cursor of a listing of runs"),
        (("events", "list", "--cursor", "abc"), "'abc' is not a cursor of a listing of events"),
        (("runs", "list", "--limit", "0"), "'0' is not a page size from 1 to 1000"),
        (("events", "list", "--since", "yesterday"), "'yesterday' is not an ISO 8601 time"),
        (("runs", "list", "--until", "2030-01-01T00:00"), "has no time zone"),
        (("runs", "list", "--status", "done"), "invalid choice: 'DONE'"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert (result.returncode, result.stdout) == (2, ""), (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
