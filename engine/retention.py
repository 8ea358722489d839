"""Retention: finished history older than the retention is deleted, in small batches.

Workers prune by themselves (a :class:`Pruner` side task of :class:`~engine.Worker`); ``engine
prune`` does it on demand (:func:`prune`). What goes: finished runs that ended more than the
retention ago on the durable clock (``engine.now()``), with their steps, matchers and history,
the events nothing holds any more, and the bookkeeping no live work needs (expired event ids
and idempotency keys, old rate-limit entries, throttles at rest, idle concurrency slots, dead
workers, long-inactive functions, unused lock rows): see ``engine.prune_history`` and
``engine.prune_bookkeeping`` in schema.sql.

A batch is two short transactions (history, then bookkeeping) of at most ``batch`` rows of each
kind, taken with ``SKIP LOCKED``: pruning never waits for a router or a claim, and locks only
finished runs, which no claim reads, and rows no live work uses. A pause follows each batch (at
least as long as the batch took), so pruning uses at most about half of one connection and
yields the server to the workload between batches. A pass goes on until a batch deletes less
than its size of every kind.

One worker of a database prunes at a time: a pass takes the database's turn (a lease on the row
of ``engine.pruner``, renewed at each batch) and, when it ends, keeps the others from starting
another pass for ``every``. A worker that finds the turn taken skips its pass. Retention is the
database's: the workers of every app sharing it prune all of its history, so give them the same
retention (the shortest one wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from uuid import UUID

from .db import Database
from .durations import Duration, parse_duration
from .errors import ConfigurationError
from .logs import engine_logger
from .serialization import loads

log = engine_logger()

DEFAULT_RETENTION = timedelta(days=30)
PRUNE_EVERY = timedelta(minutes=5)  # a worker's passes; the first comes FIRST_PASS_AFTER start
FIRST_PASS_AFTER = 10.0  # seconds (or ``every`` if shorter)
PRUNE_BATCH = 1000  # rows of each kind per batch
PRUNE_PAUSE = 0.05  # seconds after a batch, at least (else as long as the batch took)
TURN_LEASE = timedelta(minutes=2)  # a pass whose worker died passes its turn on after this
RELEASE_TIMEOUT = 3.0  # seconds a stopping pass gives to handing its turn back

Counts = dict[str, int]


def retention_option(value: Duration | None, *, what: str = "retention") -> timedelta | None:
    """The retention as a ``timedelta`` (``None``: pruning off).

    Raises:
        ConfigurationError: not a duration, or not positive.
    """
    if value is None:
        return None
    try:
        age = parse_duration(value, what=what)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
    if age <= timedelta(0):
        raise ConfigurationError(
            f"{what}: {value!r} keeps nothing; give a positive duration such as '30d',"
            " or None to turn pruning off"
        )
    return age


async def prune_batch(db: Database, age: timedelta, batch: int) -> Counts:
    """One batch: history, then bookkeeping, each in its own transaction. Rows deleted by kind."""
    counts: Counts = loads(await db.fetchval("prune_history", age, batch))
    counts.update(loads(await db.fetchval("prune_bookkeeping", age, batch)))
    return counts


async def prune(
    db: Database,
    age: timedelta,
    *,
    batch: int = PRUNE_BATCH,
    pause: float = PRUNE_PAUSE,
    go_on: Callable[[], Awaitable[bool]] | None = None,
) -> Counts:
    """Prunes batch after batch until one deletes less than ``batch`` of every kind, pausing
    after each; returns the rows deleted by kind. ``go_on`` is awaited before each batch after
    the first: False stops."""
    if batch < 1:
        raise ConfigurationError(f"batch: {batch} rows; give at least 1")
    total: Counts = {}
    while True:
        began = time.monotonic()
        counts = await prune_batch(db, age, batch)
        for kind, deleted in counts.items():
            total[kind] = total.get(kind, 0) + deleted
        if max(counts.values(), default=0) < batch:
            return total
        await asyncio.sleep(max(pause, time.monotonic() - began))
        if go_on is not None and not await go_on():
            return total


class Pruner:
    """A worker's periodic pruning (see the module docstring).

    Args:
        owner: the worker's id, which holds the database's pruning turn during a pass.
        age: the retention: what ended or arrived longer ago than this goes.
        every: the time between passes (the first comes shortly after start).
        batch: rows of each kind per batch.
        pause: the least pause after a batch, in seconds.
    """

    def __init__(
        self,
        owner: UUID,
        age: timedelta,
        *,
        every: Duration = PRUNE_EVERY,
        batch: int = PRUNE_BATCH,
        pause: float = PRUNE_PAUSE,
    ) -> None:
        self.owner = owner
        self.age = age
        self.every = parse_duration(every, what="prune_every")
        if self.every <= timedelta(0):
            raise ConfigurationError("prune_every: give a positive duration")
        self.batch = batch
        self.pause = pause
        self.passes = 0  # passes this worker made (observability, tests)
        self.skipped = 0  # passes skipped: another worker had the turn
        self.deleted: Counts = {}  # rows this worker's passes deleted, by table

    async def run(self, db: Database) -> None:
        """Prunes every ``every`` until cancelled; a pass that fails is logged and the next
        one tries again (pruning never stops the worker)."""
        await asyncio.sleep(min(FIRST_PASS_AFTER, self.every.total_seconds()))
        while True:
            try:
                await self.prune_pass(db)
            except Exception as exc:
                log.warning(
                    "worker.prune_failed",
                    error=str(exc) or repr(exc),
                    error_type=type(exc).__name__,
                )
            await asyncio.sleep(self.every.total_seconds())

    async def prune_pass(self, db: Database) -> Counts | None:
        """One pass, if this worker gets the turn; the rows deleted by kind (None: skipped)."""
        if not await self._turn(db):
            self.skipped += 1
            log.debug("worker.prune_skipped", reason="another worker pruned or is pruning")
            return None
        try:
            began = time.monotonic()
            total = await prune(
                db, self.age, batch=self.batch, pause=self.pause, go_on=lambda: self._turn(db)
            )
            deleted = {kind: n for kind, n in total.items() if n}
            for kind, n in deleted.items():
                self.deleted[kind] = self.deleted.get(kind, 0) + n
            self.passes += 1
            if deleted:
                seconds = round(time.monotonic() - began, 3)
                log.info("worker.pruned", deleted=deleted, seconds=seconds)
        finally:
            await self._give_turn_back(db)
        return total

    async def _turn(self, db: Database) -> bool:
        """Takes or renews the database's pruning turn; False: another worker has it."""
        return bool(await db.fetchval("prune_turn", self.owner, TURN_LEASE))

    async def _give_turn_back(self, db: Database) -> None:
        """Ends the turn: no pass starts anywhere for ``every``. Bounded, and never raises: a
        stopping worker must not wait on a database that does not answer (the turn's lease
        then ends by itself). Bounded with ``asyncio.timeout``, not ``wait_for``: this runs in
        the ``finally`` of a pass that a stopping worker cancels, and on Python 3.11
        ``wait_for`` loses a cancellation that arrives as its call completes; the pruner then
        went on pruning and the worker's stop waited for it forever."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(RELEASE_TIMEOUT):
                await db.fetchval("prune_rest", self.owner, self.every)
