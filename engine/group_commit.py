"""Group concurrent writes of many runs into one transaction.

A worker executes many runs at once; each step checkpoint, run end and suspension is a small
transaction whose cost is mostly its commit (a WAL flush with synchronous_commit on). A
:class:`GroupCommitter` sends a call at once when nothing is in flight and, while a round trip is in
flight, queues the calls of other runs; the next round trip carries all of them
(``engine.checkpoint_many`` and friends), each with its own result. An idle worker pays no
added latency; a busy one pays one commit per batch instead of one per run. The server writes
a batch of checkpoints or run ends as one statement (``engine.checkpoint_set``,
``engine.finish_set``), not a function call per item.

Durability is unchanged: a caller's ``await`` returns only once its own write is committed.

A batch is written in the order of its items' keys (their run ids), the order in which the
heartbeat locks runs too: a worker's concurrent transactions lock run rows in one order, so they
do not deadlock each other.

An item that goes alone may take a typed form instead (``engine.checkpoint_completed``: one
completed step, the usual checkpoint of a run whose steps run one after another; a run's end,
``engine.finish_run``): the server then runs the item's own function, not the set form that
pays off for a batch, and the item's JSON is never built.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .db import Database
from .errors import SchemaMissingError

MAX_BATCH = 200

Item = str | Callable[[], str]  # a JSON object as text, or what builds it when it is needed
# What waits in the queue: key, item, typed form if any, and the caller's result. The item's
# JSON is built only if it goes in a batch: a batch of one takes the typed form.
Entry = tuple[str, Item, tuple[Any, ...] | None, asyncio.Future[str]]


class GroupCommitter:
    """Groups calls of one ``*_many`` query; :meth:`call` returns that item's result."""

    def __init__(self, db: Database, query: str, alone_query: str | None = None) -> None:
        self._conn = db.held()  # one round trip in flight at a time, back to back
        self._query = query
        self._alone_query = alone_query  # the typed form of one item, when the write has one
        self._queue: list[Entry] = []
        self._busy = False  # a round trip of this committer is in flight
        self._draining: set[asyncio.Task[None]] = set()

    async def call(self, item: Item, key: str, alone: tuple[Any, ...] | None = None) -> str:
        """Sends one item (a JSON object, as text: step outputs arrive pre-encoded; or a callable
        that builds it) and returns its own result (e.g. ``'ok'`` or ``'lost'``). When no round
        trip is in flight it is sent at once, from the caller's task; otherwise it waits for the
        next batch, where it takes its place by ``key`` (the run id). ``alone``: the arguments
        of the committer's ``alone_query``, the same write in typed form, used when the item
        goes by itself."""
        if self._busy:
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._queue.append((key, item, alone, future))
            return await future
        self._busy = True
        try:
            result = await self._send_one(item, alone)
        finally:
            self._busy = False
            if self._queue:
                self._start_draining()
        return result

    def _start_draining(self) -> None:
        self._busy = True
        task = asyncio.create_task(self._drain())
        self._draining.add(task)  # keep a reference until it ends
        task.add_done_callback(self._draining.discard)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._send_batch(batch)
        finally:
            self._busy = False

    async def _send_batch(self, batch: list[Entry]) -> None:
        if len(batch) > 1:
            batch.sort(key=lambda entry: entry[0])
            try:
                results = await self._send([_encoded(item) for _, item, _, _ in batch])
            except Exception:
                pass  # one bad item must not fail the others: they go one by one, below
            else:
                for (_, _, _, future), result in zip(batch, results, strict=True):
                    _settle(future, result)
                return
        for _, item, alone, future in batch:  # a batch of one takes its typed form, if any
            try:
                _settle(future, await self._send_one(item, alone))
            except Exception as exc:
                _settle(future, exc)

    async def close(self) -> None:
        """Gives the held connection back to the pool (the worker stopped)."""
        await self._conn.close()

    async def _send_one(self, item: Item, alone: tuple[Any, ...] | None) -> str:
        if alone is not None and self._alone_query is not None:
            try:
                [row] = await self._conn.fetch(self._alone_query, *alone)
                return str(row["result"])
            except SchemaMissingError:
                # A schema older than this worker (a rolling deploy ahead of `engine migrate`):
                # the JSON form, which every version of the schema has, from now on.
                self._alone_query = None
        [result] = await self._send([_encoded(item)])
        return result

    async def _send(self, items: list[str]) -> list[str]:
        rows = await self._conn.fetch(self._query, "[" + ",".join(items) + "]")
        return [row["result"] for row in rows]


def _encoded(item: Item) -> str:
    return item if isinstance(item, str) else item()


def _settle(future: asyncio.Future[str], outcome: str | BaseException) -> None:
    if future.done():  # the caller was cancelled meanwhile (its run was abandoned)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class GroupCommit:
    """The group committers of one worker, one per kind of write.

    With ``synchronous_commit=False``, their transactions commit without waiting for the WAL
    flush (the writes of functions declared with ``Checkpointing(synchronous_commit=False)``).
    A worker keeps such committers apart from its durable ones: one transaction commits one
    way, so a relaxed write batched with durable ones would relax them too.
    """

    def __init__(self, db: Database, *, synchronous_commit: bool = True) -> None:
        kind = "" if synchronous_commit else "_relaxed"
        self.checkpoint = GroupCommitter(
            db, f"checkpoint_many{kind}", alone_query=f"checkpoint_completed{kind}"
        )
        self.finish = GroupCommitter(db, f"finish_many{kind}", alone_query=f"finish_alone{kind}")
        self.suspend = GroupCommitter(db, f"suspend_many{kind}")

    async def close(self) -> None:
        """Gives the connections the committers hold back to the pool."""
        for committer in (self.checkpoint, self.finish, self.suspend):
            await committer.close()
