"""Batched writes: concurrent calls share round trips, each gets its own result."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from engine.batching import Batcher


def checkpoint_item(run: str) -> str:
    return json.dumps({"run": run, "owner": str(uuid.uuid4()), "token": 1, "steps": []})


async def test_concurrent_calls_share_round_trips_and_a_bad_item_fails_alone(
    make_engine: Any,
) -> None:
    app = make_engine()
    db = await app.database()
    sent: list[int] = []
    send = Batcher._send

    async def counting(self: Batcher, items: list[str]) -> list[str]:
        sent.append(len(items))
        return await send(self, items)

    batcher = Batcher(db, "checkpoint_many")
    batcher._send = counting.__get__(batcher)  # type: ignore[method-assign]
    items = [checkpoint_item(str(uuid.uuid4())) for _ in range(30)]
    items[17] = checkpoint_item("not-a-uuid")
    results = await asyncio.gather(*(batcher.call(item) for item in items), return_exceptions=True)
    assert [r for i, r in enumerate(results) if i != 17] == ["lost"] * 29  # runs nobody leases
    assert isinstance(results[17], asyncpg.DataError)
    assert sent[0] == 1  # the first call went out at once, alone
    assert sum(1 for size in sent if size > 1) >= 1  # the rest were grouped while it flew
    assert len(sent) < 30 + 29  # a failed batch is retried item by item, and only that one


async def test_a_lone_call_is_sent_at_once(make_engine: Any) -> None:
    app = make_engine()
    db = await app.database()
    batcher = Batcher(db, "checkpoint_many")
    assert await batcher.call(checkpoint_item(str(uuid.uuid4()))) == "lost"
    with pytest.raises(asyncpg.DataError):
        await batcher.call(checkpoint_item("nope"))
    assert await batcher.call(checkpoint_item(str(uuid.uuid4()))) == "lost"  # still usable
