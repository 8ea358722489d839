"""The run lifecycle as a state machine: random sequences of the real SQL functions (claim,
checkpoint, finish, fail and retry, sleep, wait for an event, event arrival, wake-up, cancel,
lease expiry), with the invariants checked after each step: a run is in exactly one state, a
terminal run never changes, a step is recorded at most once and never rewritten, a lease has one
holder and a stale holder's writes are refused, an event resumes a wait once and at most one
wait of a run, and no matcher outlives its run."""

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
PAUSED = {"QUEUED", "SLEEPING", "RETRYING", "WAITING"}  # released, with a time to wake up
WAITS = ["w0", "w1"]


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
        self.tokens: dict[uuid.UUID, int] = {}  # the highest lease token each run was given
        self.attempts: dict[uuid.UUID, int] = {}
        self.resumed: dict[tuple[uuid.UUID, str], int] = {}  # wait -> the event that resumed it
        self.signal = f"sm/signal-{self.app}"

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
            assert row["lease_token"] > self.tokens.get(row["id"], 0), "a lease token came back"
            self.tokens[row["id"]] = row["lease_token"]
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
        requested = self.do(
            self.conn.fetchval("SELECT cancel_requested FROM engine.runs WHERE id = $1", run)
        )
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
        # A cancel requested before the end wins: the run ends CANCELLED, whatever `status` is.
        assert result == (("cancel" if requested else "ok") if holds else "lost")
        if holds:
            self.leases.pop(run)
            self.terminal[run] = self.snapshot(run)

    @rule(run=runs)
    def sleep(self, run: uuid.UUID) -> None:
        owner, token = self.leases.get(run, (OWNERS[0], 0))
        result = self.do(
            self.conn.fetchval(
                "SELECT engine.suspend_run($1, $2, $3, 'SLEEPING', engine.now() + '1 second',"
                " 'nap', $4, 0, '[]', '{}')",
                run,
                owner,
                token,
                self.attempts.get(run, 0),
            )
        )
        self.released(run, result)

    @rule(run=runs)
    def retry(self, run: uuid.UUID) -> None:
        """The function's body failed: the run is released to try again after a backoff."""
        owner, token = self.leases.get(run, (OWNERS[0], 0))
        attempt = self.attempts.get(run, 0) + 1
        result = self.do(
            self.conn.fetchval(
                "SELECT engine.suspend_run($1, $2, $3, 'RETRYING', engine.now() + '1 second',"
                " 'retry', $4, 0, '[]', '{}')",
                run,
                owner,
                token,
                attempt,
            )
        )
        self.released(run, result)
        if result != "lost":  # a cancel requested meanwhile ends the run, with this attempt
            self.attempts[run] = attempt

    @rule(run=runs, key=st.sampled_from(WAITS))
    def wait(self, run: uuid.UUID, key: str) -> None:
        """A wait for the signal event: its WAITING step and matcher (with a look back to the
        trigger), then the suspension, as a worker does."""
        if (run, key) in self.resumed:
            return  # a replay would find the wait resolved, and not wait again
        owner, token = self.leases.get(run, (OWNERS[0], 0))
        step = {"key": key, "position": 10 + WAITS.index(key), "kind": "wait"}
        step |= {"status": "WAITING", "attempts": 0, "output": None}
        matcher = {"key": key, "kind": "wait", "event_name": self.signal}
        try:
            rows = self.do(
                self.conn.fetch(
                    "SELECT * FROM engine.register_matchers($1, $2, $3, $4::jsonb, $5::jsonb)",
                    run,
                    owner,
                    token,
                    json.dumps([step]),
                    json.dumps([matcher]),
                )
            )
        except asyncpg.PostgresError as exc:
            assert exc.sqlstate == "EN002" and not self.holds(run), exc
            return
        assert self.holds(run), "a wait was registered without the lease"
        for row in rows:
            self.resumed[(run, key)] = row["event_seq"]  # an event sent earlier resolved it
        result = self.do(
            self.conn.fetchval(
                "SELECT engine.suspend_run($1, $2, $3, 'WAITING', engine.now() + '1 hour',"
                " 'waiting', $4, 0, '[]', $5)",
                run,
                owner,
                token,
                self.attempts.get(run, 0),
                [key],
            )
        )
        self.released(run, result)

    @rule()
    def signal_arrives(self) -> None:
        """The signal event is sent and routed as the router does: each matcher by its earliest
        event, and an event resumes at most one wait of each run."""
        event_id = self.do(self.conn.fetchval("SELECT engine.send_event($1, '{}')", self.signal))
        seq = self.do(self.conn.fetchval("SELECT seq FROM engine.events WHERE id = $1", event_id))
        rows = self.do(self.conn.fetch("SELECT * FROM engine.matcher_candidates($1)", [seq]))
        first: dict[uuid.UUID, str] = {}
        for row in rows:
            first.setdefault(row["run_id"], row["key"])
        matches = [{"run_id": str(r), "key": k, "event_seq": seq} for r, k in first.items()]
        resolved = self.do(
            self.conn.fetchval("SELECT engine.resolve_matches($1::jsonb)", json.dumps(matches))
        )
        assert resolved == len(matches)
        for run, key in first.items():
            assert (run, key) not in self.resumed, "a wait was resumed twice"
            self.resumed[(run, key)] = seq

    def holds(self, run: uuid.UUID) -> bool:
        return run in self.leases and run not in self.terminal

    def released(self, run: uuid.UUID, result: str) -> None:
        """Checks and notes the outcome of a suspension."""
        if not self.holds(run):
            assert result == "lost", f"a suspension without the lease returned {result}"
            return
        assert result in ("ok", "cancel")
        self.leases.pop(run)
        if result == "cancel":
            self.terminal[run] = self.snapshot(run)

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
    def a_run_is_in_exactly_one_state(self) -> None:
        """Its status, and the fields that go with it: a lease holder only while RUNNING, an
        end only when terminal, a time to wake up while released; attempts never go back."""
        rows = self.do(
            self.conn.fetch(
                "SELECT id, status, lease_owner, lease_token, ended_at, due_at, attempt"
                " FROM engine.runs WHERE app_id = $1",
                self.app,
            )
        )
        for row in rows:
            status = row["status"]
            assert status in TERMINAL | PAUSED | {"RUNNING"}, row
            assert (status == "RUNNING") == (row["lease_owner"] is not None), row
            assert (status in TERMINAL) == (row["ended_at"] is not None), row
            assert status not in PAUSED or row["due_at"] is not None, row
            assert row["attempt"] == self.attempts.get(row["id"], 0), row
            if row["id"] in self.leases:
                assert (row["lease_owner"], row["lease_token"]) == self.leases[row["id"]], row

    @invariant()
    def an_event_resumes_a_wait_once(self) -> None:
        """Each resumed wait is COMPLETED with the event that resumed it, for good; a wait
        not resumed is WAITING while its run goes on, CANCELLED once the run ended (no step
        stays open in a finished run); no run had two waits resumed by one event; no matcher
        outlives its run."""
        rows = self.do(
            self.conn.fetch(
                "SELECT s.run_id, s.step_key, s.status, s.event_seq, r.status AS run_status"
                " FROM engine.steps s"
                " JOIN engine.runs r ON r.id = s.run_id WHERE r.app_id = $1 AND s.kind = 'wait'",
                self.app,
            )
        )
        waits = {(row["run_id"], row["step_key"]): row for row in rows}
        for key, seq in self.resumed.items():
            assert waits[key]["status"] == "COMPLETED" and waits[key]["event_seq"] == seq
        for key, row in waits.items():
            open_status = "CANCELLED" if row["run_status"] in TERMINAL else "WAITING"
            assert key in self.resumed or row["status"] == open_status, row
        per_run = [(run, seq) for (run, _), seq in self.resumed.items()]
        assert len(per_run) == len(set(per_run)), "one event resumed two waits of a run"
        orphans = self.do(
            self.conn.fetchval(
                "SELECT count(*) FROM engine.matchers m JOIN engine.runs r ON r.id = m.run_id"
                " WHERE r.app_id = $1 AND r.status = ANY ($2)",
                self.app,
                list(TERMINAL),
            )
        )
        assert orphans == 0, "a matcher outlived its run"


async def test_run_lifecycle_state_machine(database_url: str) -> None:
    RunLifecycle.database_url = database_url
    config = settings(
        max_examples=60,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    await asyncio.to_thread(run_state_machine_as_test, RunLifecycle, settings=config)
