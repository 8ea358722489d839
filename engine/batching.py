"""Group concurrent writes of many runs into one transaction.

A worker executes many runs at once; each step checkpoint, run end and suspension is a small
transaction whose cost is mostly its commit (a WAL flush with synchronous_commit on). A
:class:`Batcher` sends the first call at once and, while that round trip is in flight, queues
the calls of other runs; the next round trip carries all of them (``engine.checkpoint_many``
and friends), each with its own result. An idle worker pays no added latency; a busy one pays
one commit per batch instead of one per run.

Durability is unchanged: a caller's ``await`` returns only once its own write is committed.
"""

from __future__ import annotations

import asyncio

from .db import Database

MAX_BATCH = 200


class Batcher:
    """Batches calls of one ``*_many`` query; :meth:`call` returns that item's result."""

    def __init__(self, db: Database, query: str) -> None:
        self._db = db
        self._query = query
        self._queue: list[tuple[str, asyncio.Future[str]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def call(self, item: str) -> str:
        """Queues one item (a JSON object, as text: step outputs arrive pre-encoded) and waits
        for its own result (e.g. ``'ok'`` or ``'lost'``)."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                results = await self._send([item for item, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                    continue
                # One bad item must not fail the others: send them one by one.
                for item, future in batch:
                    try:
                        [result] = await self._send([item])
                        _settle(future, result)
                    except Exception as single:
                        _settle(future, single)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                _settle(future, result)

    async def _send(self, items: list[str]) -> list[str]:
        rows = await self._db.fetch(self._query, "[" + ",".join(items) + "]")
        return [row["result"] for row in rows]


def _settle(future: asyncio.Future[str], outcome: str | BaseException) -> None:
    if future.done():  # the caller was cancelled meanwhile (its run was abandoned)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class Batches:
    """The batchers of one worker, one per kind of write."""

    def __init__(self, db: Database) -> None:
        self.checkpoint = Batcher(db, "checkpoint_many")
        self.finish = Batcher(db, "finish_many")
        self.suspend = Batcher(db, "suspend_many")
