"""Routing events to the functions they trigger.

A worker claims due events (``FOR UPDATE SKIP LOCKED``), evaluates every registered function's
triggers in Python (CEL), and creates the runs in the same transaction, so that an event starts
each function exactly once even with many workers. Runs of this worker's own functions are
created already leased to it when it has room, which saves a round trip before their first step.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID

import structlog

from .db import Connection, Database, Record
from .errors import EngineError
from .flow import FLOW_OPTIONS, admission
from .function import Function
from .matching import accepts
from .serialization import dumps, loads
from .triggers import TriggerEvent

EVENT_BATCH = 200
# Past this many plain triggers of other functions, a routing tick looks those up by its
# events' names (see engine.route_events) rather than passing them: each one passed cost a tick
# about 1.5 microseconds, the lookup about 50 in all (bench/README.md, session 12).
LOOKUP_ABOVE = 40

log = structlog.get_logger("engine")


@dataclass(frozen=True)
class RegisteredFunction:
    """A function known from the registry: possibly of another app, with its triggers."""

    app_id: str
    fn_id: str
    triggers: tuple[TriggerEvent, ...]
    flow: dict[str, Any] = field(default_factory=dict)  # registry form of flow control
    local: bool = False  # this worker has its code: its runs may be leased here at creation


@dataclass
class RoutedRun:
    """A run the router created and leased to this worker, with its event: decoded already, or
    as JSON text (routed in SQL), decoded when the run starts, where a failure fails that run
    alone (see ``Worker._start_routed``)."""

    row: Record
    event: dict[str, Any] | str
    traceparent: str | None

    def decoded_event(self) -> dict[str, Any]:
        """The event as a dict; raises whatever decoding raises (RecursionError, ValueError)."""
        if isinstance(self.event, str):
            decoded: dict[str, Any] = loads(self.event)
            return decoded
        return self.event


class Unroutable(Exception):
    """Internal: one event cannot be routed (its data cannot be read, or evaluating a trigger
    or a flow control key on it failed); it is dead-lettered with this reason."""


class Router:
    """Creates runs from due events for every function of the registry."""

    def __init__(self, db: Database, app_id: str, functions: dict[str, Function]) -> None:
        self._db = db
        self._app_id = app_id
        self._own = [
            RegisteredFunction(app_id, f.fn_id, tuple(f.event_triggers), f.flow(), local=True)
            for f in functions.values()
        ]
        self._others: list[RegisteredFunction] = []
        self._version: int | None = None  # engine.meta's registry_version of self._others
        self._compiled: dict[str, tuple[TriggerEvent, ...]] = {}
        self._local_simple: Counter[str] = Counter()  # plain local triggers by event name
        # By event name, for a send: its plain triggers (JSON array items) and whether it is
        # complex. A send passes those of its own events' names only (see send_and_route).
        self._simple_by_name: dict[str, str] = {}
        self._complex_names: frozenset[str] = frozenset()
        # What a routing tick passes (engine.route_simple): every plain trigger of the registry
        # and its complex names; or, past LOOKUP_ABOVE plain triggers of other functions, its
        # own functions' only, the others being looked up by the events' names in SQL.
        self._tick_simple = "[]"
        self._tick_complex: list[str] = []
        own_simple, own_complex = _split(self._own)
        self._own_routing = dumps({"own": own_simple, "mine": [fn.fn_id for fn in self._own]})
        self._own_complex = sorted(own_complex)

    async def route(
        self, owner: UUID, lease: timedelta, capacity: int
    ) -> tuple[int, list[RoutedRun]]:
        """Routes due events; returns how many were routed and the runs leased here.

        Events that need no Python (see ``engine.route_simple``) are routed in one statement;
        the others, and all of them when the registry moved, take the full path.
        """
        routed, mine, deferred = (
            (0, [], True)
            if self._version is None
            else (await self._route_simple(owner, lease, capacity))
        )
        if deferred:
            more, also_mine = await self._route_full(owner, lease, max(capacity - len(mine), 0))
            return routed + more, mine + also_mine
        return routed, mine

    async def _route_simple(
        self, owner: UUID, lease: timedelta, capacity: int
    ) -> tuple[int, list[RoutedRun], bool]:
        rows = await self._db.fetch(
            "route_simple",
            EVENT_BATCH,
            self._tick_simple,
            self._tick_complex,
            self._version,
            self._app_id,
            owner,
            lease,
            capacity,
        )
        summary, mine = _summary_and_runs(rows)
        return summary["routed"], mine, summary["deferred"]

    async def load_registry(self) -> None:
        """Loads the registry now, rather than with the first event routed: a send in this
        process can then be routed in its own transaction from the start."""
        async with self._db.transaction() as conn:
            # The version first: if the registry moves in between, the one loaded is newer
            # than the version noted, which only makes the next routing load it again.
            version = await self._db.fetchval("registry_version", conn=conn)
            await self._load_registry(conn)
        self._version = version
        self._split_registry()

    async def send_and_route(
        self,
        payload: str,
        names: Collection[str],
        *,
        traceparent: str | None,
        owner: UUID,
        lease: timedelta,
        capacity: int,
    ) -> tuple[list[str], list[RoutedRun]]:
        """Stores the events of ``payload`` (whose names are ``names``) and routes, in the same
        transaction, those that need no Python (see ``engine.send_and_route``); returns their
        ids and the runs leased here.

        Only the triggers of ``names`` go with the call: the whole registry (every trigger of
        every app of the schema) cost each send its transfer and parsing, 0.25 ms more a send
        with 200 other triggers and 2.5 ms with 2,000. Before the registry is loaded (no
        routing yet), nothing is routed here: the events wait for the routers, as any sent
        event does.
        """
        distinct = set(names)
        simple = ",".join(self._simple_by_name[n] for n in distinct if n in self._simple_by_name)
        rows = await self._db.fetch(
            "send_and_route",
            payload,
            traceparent,
            f"[{simple}]",
            sorted(distinct & self._complex_names),
            -1 if self._version is None else self._version,  # matches no registry version
            self._app_id,
            owner,
            lease,
            capacity,
        )
        summary, mine = _summary_and_runs(rows)
        return list(summary["ids"] or ()), mine

    def most_runs_here(self, names: list[str]) -> int:
        """The most runs that events of these names may start leased to this worker when routed
        in SQL: one per plain trigger of a local function on each name."""
        return sum(self._local_simple.get(name, 0) for name in names)

    def _split_registry(self) -> None:
        """Sorts the registry's event triggers, for a send in this process (which passes those
        of its events' names): plain ones (no expression, on a function with no flow control)
        can be routed in SQL; any other trigger makes its event name complex."""
        simple, complex_names = _split([*self._own, *self._others])
        by_name: dict[str, list[dict[str, Any]]] = {}
        for entry in simple:
            by_name.setdefault(entry["event"], []).append(entry)
        self._local_simple = Counter(entry["event"] for entry in simple if entry["local"])
        self._simple_by_name = {name: dumps(entries)[1:-1] for name, entries in by_name.items()}
        self._complex_names = frozenset(complex_names)
        if sum(not entry["local"] for entry in simple) > LOOKUP_ABOVE:
            self._tick_simple, self._tick_complex = self._own_routing, self._own_complex
        else:
            self._tick_simple, self._tick_complex = dumps(simple), sorted(complex_names)

    async def _route_full(
        self, owner: UUID, lease: timedelta, capacity: int
    ) -> tuple[int, list[RoutedRun]]:
        """Routes one batch of due events in a transaction: claim, CEL in Python, create."""
        async with self._db.transaction() as conn:
            events = await self._db.fetch("claim_events", EVENT_BATCH, conn=conn)
            if not events:
                return 0, []
            if events[0]["registry_version"] != self._version:
                # Another app registered or changed functions: route with the current registry.
                await self._load_registry(conn)
                self._version = events[0]["registry_version"]
                self._split_registry()
            plan, by_seq, dead = self._plan(events, capacity)
            if dead:
                await self._db.fetchval("dead_letter", dumps(dead), conn=conn)
            created = await self._db.fetch(
                "create_runs", [e["seq"] for e in events], dumps(plan), owner, lease, conn=conn
            )
            awaited = [e["seq"] for e in events if e["awaited"] and e["seq"] in by_seq]
            if awaited:
                await self._resolve_matchers(awaited, by_seq, conn)
        mine = [
            RoutedRun(
                row, by_seq[row["event_seq"]]["event"], by_seq[row["event_seq"]]["traceparent"]
            )
            for row in created
            if row["lease_token"] > 0
        ]
        return len(events), mine

    def _plan(
        self, events: list[Record], capacity: int
    ) -> tuple[list[dict[str, Any]], dict[int, Any], list[dict[str, Any]]]:
        """The runs to create for these events, the decoded events by seq, and the dead letters:
        an event that cannot be read or evaluated is set aside, never the batch."""
        plan: list[dict[str, Any]] = []
        by_seq: dict[int, Any] = {}
        dead: list[dict[str, Any]] = []
        for row in events:
            try:
                event, runs = self._plan_event(row, capacity)
            except Unroutable as exc:
                cause = exc.__cause__
                error = {"type": type(cause).__name__, "message": str(exc)}
                dead.append({"seq": row["seq"], "error": error})
                log.error("event.dead_lettered", event_seq=row["seq"], name=row["name"], **error)
                continue
            by_seq[row["seq"]] = {"event": event, "traceparent": row["traceparent"]}
            capacity -= sum(run["claim"] for run in runs)
            plan.extend(runs)
        return plan, by_seq, dead

    def _plan_event(
        self, row: Record, capacity: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One event, decoded, and its runs; raises :class:`Unroutable` with the reason."""
        try:
            event: dict[str, Any] = loads(row["event"])
        except Exception as exc:  # RecursionError, a number Python refuses, ...
            raise Unroutable(f"its data cannot be read: {type(exc).__name__}: {exc}") from exc
        try:
            runs = [self._run_entry(fn, row["seq"], event) for fn in self._matching(event)]
        except Exception as exc:
            raise Unroutable(
                f"evaluating its triggers or flow control keys failed: {type(exc).__name__}: {exc}"
            ) from exc
        for run in runs:  # the first ones that may run here at once are created leased to us
            run["claim"] = run["claim"] and capacity > 0
            capacity -= run["claim"]
        return event, runs

    def _run_entry(self, fn: RegisteredFunction, seq: int, event: dict[str, Any]) -> dict[str, Any]:
        controls = admission(fn.flow, fn.app_id, fn.fn_id, event)
        # Runs under concurrency limits are left to the claim, which takes permits.
        claim = (
            fn.local
            and not controls["concurrency"]
            and not controls.get("priority")  # a delay, or an order among queued runs
            and not controls.get("throttle")  # the claim decides when it may start
            and not controls.get("debounce_key")  # starts after a quiet period
            and not controls.get("batch_key")  # starts when full or timed out
        )
        return {
            "app_id": fn.app_id,
            "function_id": fn.fn_id,
            "event_seq": seq,
            "claim": claim,
            **controls,
        }

    async def _resolve_matchers(
        self, seqs: list[int], by_seq: dict[int, Any], conn: Connection
    ) -> None:
        """Resolves the waits, invokes and cancels these events satisfy, in the routing
        transaction: each matcher by its earliest event, and each event resumes at most one
        wait of a run (a cancel is not consumed)."""
        rows = await self._db.fetch("matcher_candidates", seqs, conn=conn)
        matches: list[dict[str, Any]] = []
        taken: set[tuple[Any, str]] = set()
        consumed: set[tuple[Any, int]] = set()
        for row in rows:
            run_id, key, seq = row["run_id"], row["key"], row["event_seq"]
            consumes = row["kind"] != "cancel"
            if (run_id, key) in taken or (consumes and (run_id, seq) in consumed):
                continue
            if not self._accepts(row, by_seq[seq]["event"]):
                continue
            taken.add((run_id, key))
            if consumes:
                consumed.add((run_id, seq))
            matches.append({"run_id": str(run_id), "key": key, "event_seq": seq})
        if matches:
            await self._db.fetchval("resolve_matches", dumps(matches), conn=conn)

    @staticmethod
    def _accepts(row: Record, event: dict[str, Any]) -> bool:
        """Whether a wait's or a cancel's expression accepts the event. One that cannot be
        evaluated on it (the run's trigger cannot be read, say) does not: that run waits on,
        and the routing goes on for every other event and run."""
        try:
            trigger = None if row["trigger"] is None else loads(row["trigger"])
            return accepts(row["expression"], trigger, event)
        except Exception as exc:
            log.error(
                "matcher.unreadable",
                run_id=str(row["run_id"]),
                key=row["key"],
                error=f"{type(exc).__name__}: {exc}",
            )
            return False

    def _matching(self, event: dict[str, Any]) -> list[RegisteredFunction]:
        return [
            fn for fn in (*self._own, *self._others) if any(t.matches(event) for t in fn.triggers)
        ]

    async def _load_registry(self, conn: Connection) -> None:
        """Loads the active functions this worker does not have: other apps', and those of its
        own app that another version registered (a rolling deploy), whose runs are created
        QUEUED for a worker that has them."""
        rows = await self._db.fetch("registry", conn=conn)
        own = {fn.fn_id for fn in self._own}
        others = []
        for row in rows:
            if row["app_id"] == self._app_id and row["function_id"] in own:
                continue  # this worker's own code is the truth for its functions
            triggers = self._triggers(row["triggers"])
            if triggers:
                config = json.loads(row["config"])
                flow = {k: config[k] for k in FLOW_OPTIONS if k in config}
                others.append(RegisteredFunction(row["app_id"], row["function_id"], triggers, flow))
        self._others = others

    def _triggers(self, text: str) -> tuple[TriggerEvent, ...]:
        if text not in self._compiled:
            try:
                self._compiled[text] = tuple(
                    TriggerEvent(t["event"], t.get("expression"))
                    for t in json.loads(text)
                    if "event" in t
                )
            except EngineError:
                self._compiled[text] = ()  # registered by a newer engine we cannot read: skip
        return self._compiled[text]


def _split(functions: list[RegisteredFunction]) -> tuple[list[dict[str, Any]], set[str]]:
    """The plain triggers of ``functions`` (no expression, on a function with no flow control:
    routed in SQL), as engine.route_events takes them, and the names any other trigger of
    theirs makes complex (routed in Python)."""
    simple: list[dict[str, Any]] = []
    complex_names: set[str] = set()
    for fn in functions:
        for trigger in fn.triggers:
            if trigger.if_exp is None and not fn.flow:
                simple.append(
                    {
                        "app_id": fn.app_id,
                        "function_id": fn.fn_id,
                        "event": trigger.event,
                        "local": fn.local,
                    }
                )
            else:
                complex_names.add(trigger.event)
    return simple, complex_names


def _summary_and_runs(rows: list[Record]) -> tuple[Record, list[RoutedRun]]:
    """The rows of a routing in SQL (route_simple, send_and_route): its summary first, then the
    runs it leased to this worker, with their events as JSON text."""
    return rows[0], [RoutedRun(row, row["event"], row["traceparent"]) for row in rows[1:]]
