"""The run lifecycle as a state machine: random sequences of the real SQL functions (claim,
checkpoint, finish, suspend, cancel, lease expiry), with the invariants checked after each step:
a terminal run never changes, a step is recorded at most once and never rewritten, a lease has
one holder, and a stale holder's writes are refused."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

_apps = itertools.count()
OWNERS = [uuid.UUID(int=1), uuid.UUID(int=2)]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "SKIPPED"}


class RunLifecycle(RuleBasedStateMachine):
    database_url = ""  # set by the test: one database for every example, an app per example
    runs = Bundle("runs")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.do(asyncpg.connect(self.database_url))
        self.app = f"sm{next(_apps)}"
        self.do(
            self.conn.execute(
                "INSERT INTO engine.functions (app_id, function_id) VALUES ($1, 'f')", self.app
            )
        )
        self.leases: dict[uuid.UUID, tuple[uuid.UUID, int]] = {}
        self.terminal: dict[uuid.UUID, tuple[str, Any]] = {}
        self.steps: dict[tuple[uuid.UUID, str], str] = {}

    def do(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.do(self.conn.close())
        self.loop.close()

    # -- rules --------------------------------------------------------------------------
    @rule(target=runs)
    def create(self) -> uuid.UUID:
        event_id = self.do(self.conn.fetchval("SELECT engine.send_event('sm/go', '{}')"))
        run_id: uuid.UUID = self.do(
            self.conn.fetchval(
                "SELECT (engine.insert_run($1, 'f', e.seq, NULL, NULL, NULL, NULL,"
                " engine.now())).id FROM engine.events e WHERE e.id = $2",
                self.app,
                event_id,
            )
        )
        return run_id

    @rule(owner=st.sampled_from(OWNERS))
    def claim(self, owner: uuid.UUID) -> None:
        rows = self.do(
            self.conn.fetch(
                "SELECT id, lease_token FROM engine.claim_runs($1, '{f}', $2, '1 second', 5)",
                self.app,
                owner,
            )
        )
        for row in rows:
            assert row["id"] not in self.terminal, "a terminal run was claimed"
            self.leases[row["id"]] = (owner, row["lease_token"])

    @rule(run=runs, key=st.sampled_from(["a", "b", "c"]), stale=st.booleans())
    def checkpoint(self, run: uuid.UUID, key: str, stale: bool) -> None:
        owner, token = self.leases.get(run, (OWNERS[0], 0))
        if stale:
            token -= 1
        output = json.dumps({"key": key, "nonce": uuid.uuid4().hex})
        step = {
            "key": key,
            "position": "abc".index(key),
            "kind": "run",
            "status": "COMPLETED",
            "attempts": 1,
            "output": json.loads(output),
        }
        result = self.do(
            self.conn.fetchval(
                "SELECT engine.checkpoint_steps($1, $2, $3, $4::jsonb)",
                run,
                owner,
                token,
                json.dumps([step]),
            )
        )
        holds = run in self.leases and not stale and run not in self.terminal
        if not holds:
            assert result == "lost", f"a write without the lease returned {result}"
        elif (run, key) in self.steps:
            assert result == "duplicate"
        else:
            assert result in ("ok", "cancel"), result
            self.steps[(run, key)] = output

    @rule(run=runs, status=st.sampled_from(["COMPLETED", "FAILED"]), stale=st.booleans())
    def finish(self, run: uuid.UUID, status: str, stale: bool) -> None:
        owner, token = self.leases.get(run, (OWNERS[0], 0))
        token -= 1 if stale else 0
        result = self.do(
            self.conn.fetchval(
                "SELECT engine.finish_run($1, $2, $3, $4, '\"out\"', NULL, 0, '[]')",
                run,
                owner,
                token,
                status,
            )
        )
        holds = run in self.leases and not stale and run not in self.terminal
        assert result == ("ok" if holds else "lost")
        if holds:
            self.leases.pop(run)
            self.terminal[run] = self.snapshot(run)

    @rule(run=runs)
    def sleep(self, run: uuid.UUID) -> None:
        owner, token = self.leases.get(run, (OWNERS[0], 0))
        result = self.do(
            self.conn.fetchval(
                "SELECT engine.suspend_run($1, $2, $3, 'SLEEPING', engine.now() + '1 second',"
                " 'nap', 0, 0, '[]', '{}')",
                run,
                owner,
                token,
            )
        )
        holds = run in self.leases and run not in self.terminal
        if holds:
            assert result in ("ok", "cancel")
            self.leases.pop(run)
            if result == "cancel":
                self.terminal[run] = self.snapshot(run)
        else:
            assert result == "lost"

    @rule(run=runs)
    def cancel(self, run: uuid.UUID) -> None:
        status = self.do(self.conn.fetchval("SELECT engine.cancel_run($1)", run))
        if run in self.terminal:
            assert status == self.terminal[run][0]
        elif status == "CANCELLED":
            self.leases.pop(run, None)
            self.terminal[run] = self.snapshot(run)

    @rule()
    def time_passes(self) -> None:
        """Leases expire (their holders look dead) and sleeps come due."""
        self.do(
            self.conn.execute(
                "UPDATE engine.clock SET offset_by = offset_by + $1", timedelta(seconds=2)
            )
        )

    # -- invariants ---------------------------------------------------------------------
    def snapshot(self, run: uuid.UUID) -> tuple[str, Any]:
        row = self.do(
            self.conn.fetchrow("SELECT status, ended_at FROM engine.runs WHERE id = $1", run)
        )
        return row["status"], row["ended_at"]

    @invariant()
    def terminal_runs_never_change(self) -> None:
        for run, before in self.terminal.items():
            assert self.snapshot(run) == before
            assert before[0] in TERMINAL

    @invariant()
    def recorded_steps_are_never_rewritten(self) -> None:
        rows = self.do(
            self.conn.fetch(
                "SELECT s.run_id, s.step_key, s.status, s.output::text AS output"
                " FROM engine.steps s JOIN engine.runs r ON r.id = s.run_id"
                " WHERE r.app_id = $1",
                self.app,
            )
        )
        recorded = {(r["run_id"], r["step_key"]): r for r in rows}
        assert len(recorded) == len(rows)
        for key, output in self.steps.items():
            assert recorded[key]["status"] == "COMPLETED"
            assert json.loads(recorded[key]["output"]) == json.loads(output)

    @invariant()
    def a_lease_has_one_holder(self) -> None:
        rows = self.do(
            self.conn.fetch(
                "SELECT status, lease_owner FROM engine.runs WHERE app_id = $1", self.app
            )
        )
        for row in rows:
            assert (row["status"] == "RUNNING") == (row["lease_owner"] is not None), row


async def test_run_lifecycle_state_machine(database_url: str) -> None:
    RunLifecycle.database_url = database_url
    config = settings(
        max_examples=25,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    await asyncio.to_thread(run_state_machine_as_test, RunLifecycle, settings=config)
