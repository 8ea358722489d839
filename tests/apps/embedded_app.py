"""An application embedding the engine, for tests of what the library prints (nothing, unless
the application configures logging): ``python embedded_app.py DATABASE_URL quiet|stdlib``."""

from __future__ import annotations

import asyncio
import logging
import sys

from engine import Context, Engine, Event, TriggerEvent

app = Engine("embedded", sys.argv[1] if len(sys.argv) > 1 else None)


@app.create_function("hello", trigger=TriggerEvent("embedded/go"))
async def hello(ctx: Context) -> str:
    ctx.logger.info("hello.logged", n=1)
    return "hi"


async def main() -> None:
    async with app.worker(poll_interval="100ms"):
        [event_id] = await app.send(Event(name="embedded/go"))
        [run] = await app.runs_for_event(event_id, at_least=1)
        await app.wait_for_run(run.run_id)
    await app.close()


if __name__ == "__main__":
    if sys.argv[2] == "stdlib":
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(main())
