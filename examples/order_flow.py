"""An order that waits for its payment, with a timeout and a cancel event.

    engine dev examples/order_flow.py

Each order reserves stock, then waits up to 24 hours for `shop/payment.succeeded` with the
same order id. Paid orders ship; unpaid ones release their stock when the wait times out; an
`shop/order.cancelled` event cancels the run wherever it is (here, while it waits). The demo
fast-forwards durable time instead of waiting a day.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engine import Cancel, Context, Engine, Event, RunStatus, TriggerEvent
from engine.testing import advance_clock

app = Engine(app_id="shop")


def reserve_stock(order_id: str, items: list[str]) -> dict[str, Any]:
    return {"order_id": order_id, "reserved": items}


def ship(order_id: str, payment_id: str) -> str:
    return f"order {order_id} shipped (payment {payment_id})"


def release_stock(order_id: str) -> str:
    return f"order {order_id} unpaid after 24h: stock released"


@app.create_function(
    fn_id="order-flow",
    trigger=TriggerEvent("shop/order.created"),
    cancel=[Cancel(event="shop/order.cancelled", match="data.order_id")],
)
async def order_flow(ctx: Context) -> str:
    order_id = ctx.event.data["order_id"]
    await ctx.step.run("reserve-stock", reserve_stock, order_id, ctx.event.data["items"])
    payment = await ctx.step.wait_for_event(
        "wait-for-payment",
        event="shop/payment.succeeded",
        match="data.order_id",  # the payment's order_id equals this order's
        timeout="24h",
    )
    if payment is None:
        return await ctx.step.run("release-stock", release_stock, order_id)
    return await ctx.step.run("ship", ship, order_id, payment.data["payment_id"])


async def demo(app: Engine) -> None:
    """Called by `engine dev`: three orders, three endings."""
    ids = await app.send(
        [
            Event(name="shop/order.created", data={"order_id": f"A-{n}", "items": ["mug"]})
            for n in (1, 2, 3)
        ]
    )
    runs = [await _run_of(app, event_id) for event_id in ids]
    for run_id in runs:  # each order reserved its stock and waits for its payment
        await _waiting(app, run_id)
    await app.send(
        [
            Event(name="shop/payment.succeeded", data={"order_id": "A-1", "payment_id": "p-9"}),
            Event(name="shop/order.cancelled", data={"order_id": "A-3"}),
        ]
    )
    await app.wait_for_run(runs[0])
    await app.wait_for_run(runs[2])
    await advance_clock(app, "25h")  # order A-2 never gets paid
    for run_id in runs:
        run = await app.wait_for_run(run_id)
        steps = ", ".join(s.step_id for s in run.steps)
        print(f"{run.event.data['order_id']}: {run.status.value:<9} [{steps}] {run.output or ''}")


async def _waiting(app: Engine, run_id: str) -> None:
    """Returns once the run waits for its payment (a cancel sent earlier would find it
    queued, and cancel it before its first step)."""
    while (await app.get_run(run_id)).status is not RunStatus.WAITING:  # noqa: ASYNC110 - a demo polls
        await asyncio.sleep(0.01)


async def _run_of(app: Engine, event_id: str) -> str:
    runs = await app.runs_for_event(event_id, at_least=1)  # routing takes milliseconds
    return next(run.run_id for run in runs if run.app_id == app.app_id)  # not another app's
