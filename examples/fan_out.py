"""Fan-out: one event becomes one run per item (send_event); invoke gets one result back.

    engine dev examples/fan_out.py

`send_event` is a step: its events are sent once, even if the run replays. `invoke` starts
another function as a child run and waits for its output without holding a worker.
"""

from __future__ import annotations

from typing import Any

from engine import Context, Engine, Event, TriggerEvent

app = Engine(app_id="imports")


@app.create_function(fn_id="start-import", trigger=TriggerEvent("import/requested"))
async def start_import(ctx: Context) -> dict[str, Any]:
    rows = ctx.event.data["rows"]
    ids = await ctx.step.send_event(
        "fan-out", [Event(name="import/row", data={"row": row}) for row in rows]
    )
    summary = await ctx.step.invoke(
        "summarize", function=summarize, data={"rows": rows}, timeout="5m"
    )
    return {"row_event_ids": ids, "summary": summary}


@app.create_function(fn_id="import-row", trigger=TriggerEvent("import/row"))
async def import_row(ctx: Context) -> str:
    row = ctx.event.data["row"]
    return await ctx.step.run("upsert", lambda: f"upserted {row['sku']}")


@app.create_function(fn_id="summarize")  # no trigger: only invoked
async def summarize(ctx: Context) -> dict[str, Any]:
    rows = ctx.event.data["rows"]
    return await ctx.step.run(
        "totals", lambda: {"rows": len(rows), "units": sum(r["qty"] for r in rows)}
    )


async def demo(app: Engine) -> None:
    """Called by `engine dev`: an import of 20 rows."""
    rows = [{"sku": f"SKU-{n:03}", "qty": n} for n in range(1, 21)]
    [event_id] = await app.send(Event(name="import/requested", data={"rows": rows}))
    run = await app.wait_for_run(await _run_of(app, event_id))
    row_ids = run.output["row_event_ids"]
    print(f"import {run.status.value}: {len(row_ids)} row events, summary {run.output['summary']}")
    done = [await app.wait_for_run(await _run_of(app, row_id)) for row_id in row_ids]
    completed = sum(r.status.value == "COMPLETED" for r in done)
    print(f"{completed} row runs completed, e.g. {done[-1].output!r}")


async def _run_of(app: Engine, event_id: str) -> str:
    """The run an event started in this app (another app may listen to the same event)."""
    runs = await app.runs_for_event(event_id, at_least=1)  # routing takes milliseconds
    return next(run.run_id for run in runs if run.app_id == app.app_id)
