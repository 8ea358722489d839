"""Group commit: concurrent writes of many runs share round trips, each gets its own result."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from engine.group_commit import GroupCommitter


def checkpoint_item(run: str) -> str:
    return json.dumps({"run": run, "owner": str(uuid.uuid4()), "token": 1, "steps": []})


async def test_concurrent_calls_share_round_trips_and_a_bad_item_fails_alone(
    make_engine: Any,
) -> None:
    app = make_engine()
    db = await app.database()
    sent: list[int] = []
    runs_sent: list[list[str]] = []
    send = GroupCommitter._send

    async def counting(self: GroupCommitter, items: list[str]) -> list[str]:
        sent.append(len(items))
        runs_sent.append([json.loads(item)["run"] for item in items])
        return await send(self, items)

    committer = GroupCommitter(db, "checkpoint_many")
    committer._send = counting.__get__(committer)  # type: ignore[method-assign]
    runs = [str(uuid.uuid4()) for _ in range(30)]
    runs[17] = "not-a-uuid"
    items = [checkpoint_item(run) for run in runs]
    results = await asyncio.gather(
        *(committer.call(item, run) for item, run in zip(items, runs, strict=True)),
        return_exceptions=True,
    )
    assert [r for i, r in enumerate(results) if i != 17] == ["lost"] * 29  # runs nobody leases
    assert isinstance(results[17], asyncpg.DataError)
    assert sent[0] == 1  # the first call went out at once, alone
    assert sum(1 for size in sent if size > 1) >= 1  # the rest were grouped while it flew
    assert len(sent) < 30 + 29  # a failed batch is retried item by item, and only that one
    assert all(batch == sorted(batch) for batch in runs_sent)  # in run id order: no deadlocks


async def test_a_lone_call_is_sent_at_once(make_engine: Any) -> None:
    app = make_engine()
    db = await app.database()
    committer = GroupCommitter(db, "checkpoint_many")
    run = str(uuid.uuid4())
    assert await committer.call(checkpoint_item(run), run) == "lost"
    with pytest.raises(asyncpg.DataError):
        await committer.call(checkpoint_item("nope"), "nope")
    assert await committer.call(checkpoint_item(run), run) == "lost"  # still usable
