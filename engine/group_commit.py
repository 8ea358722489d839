"""Group concurrent writes of many runs into one transaction.

A worker executes many runs at once; each step checkpoint, run end and suspension is a small
transaction whose cost is mostly its commit (a WAL flush with synchronous_commit on). A
:class:`GroupCommitter` sends a call at once when nothing is in flight and, while a round trip is in
flight, queues the calls of other runs; the next round trip carries all of them
(``engine.checkpoint_many`` and friends), each with its own result. An idle worker pays no
added latency; a busy one pays one commit per batch instead of one per run.

Durability is unchanged: a caller's ``await`` returns only once its own write is committed.

A batch is written in the order of its items' keys (their run ids), the order in which the
heartbeat locks runs too: a worker's concurrent transactions lock run rows in one order, so they
do not deadlock each other.
"""

from __future__ import annotations

import asyncio

from .db import Database

MAX_BATCH = 200


class GroupCommitter:
    """Groups calls of one ``*_many`` query; :meth:`call` returns that item's result."""

    def __init__(self, db: Database, query: str) -> None:
        self._conn = db.held()  # one round trip in flight at a time, back to back
        self._query = query
        self._queue: list[tuple[str, str, asyncio.Future[str]]] = []  # (key, item, future)
        self._busy = False  # a round trip of this committer is in flight
        self._draining: set[asyncio.Task[None]] = set()

    async def call(self, item: str, key: str) -> str:
        """Sends one item (a JSON object, as text: step outputs arrive pre-encoded) and returns
        its own result (e.g. ``'ok'`` or ``'lost'``). When no round trip is in flight it is sent
        at once, from the caller's task; otherwise it waits for the next batch, where it takes
        its place by ``key`` (the run id)."""
        if self._busy:
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._queue.append((key, item, future))
            return await future
        self._busy = True
        try:
            [result] = await self._send([item])
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

    async def _send_batch(self, batch: list[tuple[str, str, asyncio.Future[str]]]) -> None:
        batch.sort(key=lambda entry: entry[0])
        try:
            results = await self._send([item for _, item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][2], exc)
                return
            # One bad item must not fail the others: send them one by one.
            for _, item, future in batch:
                try:
                    [result] = await self._send([item])
                    _settle(future, result)
                except Exception as single:
                    _settle(future, single)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            _settle(future, result)

    async def close(self) -> None:
        """Gives the held connection back to the pool (the worker stopped)."""
        await self._conn.close()

    async def _send(self, items: list[str]) -> list[str]:
        rows = await self._conn.fetch(self._query, "[" + ",".join(items) + "]")
        return [row["result"] for row in rows]


def _settle(future: asyncio.Future[str], outcome: str | BaseException) -> None:
    if future.done():  # the caller was cancelled meanwhile (its run was abandoned)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class GroupCommit:
    """The group committers of one worker, one per kind of write."""

    def __init__(self, db: Database) -> None:
        self.checkpoint = GroupCommitter(db, "checkpoint_many")
        self.finish = GroupCommitter(db, "finish_many")
        self.suspend = GroupCommitter(db, "suspend_many")

    async def close(self) -> None:
        """Gives the connections the committers hold back to the pool."""
        for committer in (self.checkpoint, self.finish, self.suspend):
            await committer.close()
