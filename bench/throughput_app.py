"""The 3-step function of the throughput benchmark, for `engine worker` processes."""

from __future__ import annotations

from engine import Context, Engine, TriggerEvent

app = Engine("bench-processes")


async def _nothing() -> None:
    return None


@app.create_function("three-steps", trigger=TriggerEvent("bench/processes"))
async def three_steps(ctx: Context) -> None:
    for name in ("a", "b", "c"):
        await ctx.step.run(name, lambda: None)
