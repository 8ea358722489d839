"""The dashboard in a real browser: Debian's headless chromium driven by Playwright, against the
app served by uvicorn on a free port, with a worker running in the same event loop.

Skipped when /usr/bin/chromium is missing (``apt-get install chromium``), unless
``ENGINE_BROWSER_TESTS=1`` (CI), which makes a missing browser a failure. With
``ENGINE_SCREENSHOTS=DIR`` the test saves a screenshot of each page (light and dark) there
(docs/img holds the ones in docs/dashboard.md).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually, only_run_id

from engine import (
    Concurrency,
    Context,
    Engine,
    Event,
    NonRetriableError,
    RunStatus,
    TriggerCron,
    TriggerEvent,
)
from engine.web import create_app
from engine.web.serve import start

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000

if not CHROMIUM.exists():
    if os.environ.get("ENGINE_BROWSER_TESTS") == "1":
        raise RuntimeError(f"ENGINE_BROWSER_TESTS=1 but there is no {CHROMIUM}")
    pytest.skip(
        f"no {CHROMIUM} (apt-get install chromium; ENGINE_BROWSER_TESTS=1 makes this a failure)",
        allow_module_level=True,
    )

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402

# A loaded CI machine may take seconds to route an event or render a page: conditions are
# waited on, for up to this long.
expect.set_options(timeout=WAIT_MS)


def shop(app: Engine, broken: dict[str, bool]) -> None:
    """``busy``: a step failing once, a sleep and a wait; ``fragile``: its second step fails
    while ``broken["second"]``; ``pack``: completes at once."""

    @app.create_function("busy", trigger=TriggerEvent("t/busy"), retries=2)
    async def busy(ctx: Context) -> Any:
        def flaky(customer: str) -> str:
            if ctx.attempt < 1:
                raise ValueError("the first try fails")
            return f"ok {customer}"

        await ctx.step.run("flaky", flaky, ctx.event.data.get("customer", "anyone"))
        await ctx.step.sleep("nap", "50ms")
        return await ctx.step.wait_for_event("reply", event="t/reply", timeout="1h")

    @app.create_function("fragile", trigger=TriggerEvent("t/fragile"), retries=0)
    async def fragile(ctx: Context) -> Any:
        await ctx.step.run("first", lambda: 1)

        def second() -> int:
            if broken["second"]:
                raise NonRetriableError("the second step is broken")
            return 2

        return await ctx.step.run("second", second)

    @app.create_function("pack", trigger=TriggerEvent("t/pack"))
    async def pack(ctx: Context) -> Any:
        return {"packed": ctx.event.data.get("n")}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def shot(page: Page, name: str) -> None:
    """Saves light and dark screenshots of the page when $ENGINE_SCREENSHOTS names a folder."""
    folder = os.environ.get("ENGINE_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a test's own folder
    for scheme in ("light", "dark"):
        await page.emulate_media(color_scheme=scheme)
        await page.screenshot(path=str(Path(folder) / f"{name}-{scheme}.png"))
    await page.emulate_media(color_scheme="light")


async def test_a_person_watches_opens_cancels_reruns_and_sends(
    make_engine: Any, browser: Browser
) -> None:
    """A run appears live on the Runs page and changes status there; its page draws the
    retried step, the sleep and the wait as bars whose details open on a click; a waiting run
    is cancelled and a failed one rerun from its failed step; an event is sent (and a bad one
    refused) from the Events page."""
    broken = {"second": True}
    app = make_engine("shop")
    shop(app, broken)
    async with app.worker(poll_interval="100ms"):
        served = await start(create_app(app), host="127.0.0.1", port=0, token=None)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 800})
            page.set_default_timeout(WAIT_MS)
            await _watch_a_run_appear_and_open_it(app, page, served.url)
            await _cancel_a_waiting_run(app, page)
            await _rerun_a_failed_run_from_a_step(app, page, served.url, broken)
            await _send_events(app, page, served.url)
            await page.close()
        finally:
            await served.stop()


async def _watch_a_run_appear_and_open_it(app: Engine, page: Page, url: str) -> None:
    [packed] = await app.send(Event(name="t/pack", data={"n": 1}))
    await app.wait_for_run(await only_run_id(app, packed))
    await page.goto(f"{url}/runs")
    await expect(page.locator("tbody tr[data-id]")).to_have_count(1)
    [event_id] = await app.send(Event(name="t/busy", data={"customer": "ada"}))
    run_id = await only_run_id(app, event_id)
    row = page.locator(f'tr[data-id="{run_id}"]')
    await expect(row).to_be_visible(timeout=WAIT_MS)  # appeared without a reload
    await expect(row.locator(".status")).to_have_text("WAITING")
    await shot(page, "runs")

    # The keyboard: j selects the newest row, Enter opens it.
    await page.keyboard.press("j")
    await expect(row).to_have_class(re.compile(r"\bselected\b"))
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(f"{url}/runs/{run_id}")
    await expect(page.locator("h1 .status")).to_have_text("WAITING")
    labels = page.locator(".wrow .label")
    for label in ("flaky #1 ✗", "flaky #2 ✓", "sleep nap", "wait reply"):
        await expect(labels.filter(has_text=label)).to_have_count(1)
    failed = page.locator(".wrow", has=page.locator(".label", has_text="flaky #1 ✗"))
    await expect(failed.locator(".bar.t-red")).to_have_count(1)
    for kind in ("sleep", "wait"):
        await expect(page.locator(f".bar.k-{kind}")).to_have_count(1)
    await expect(page.locator(".bar.k-wait.lasting")).to_have_count(1)  # still waiting

    await failed.locator(".bar").click()
    detail = page.locator(".detail:not([hidden])")
    await expect(detail).to_have_count(1)
    await expect(detail).to_contain_text("the first try fails")
    await expect(detail).to_contain_text("Traceback")
    await expect(detail.locator("h4", has_text="input")).to_have_count(1)
    await expect(detail).to_contain_text(re.compile(r'"args":\s*\[\s*"ada"\s*\]'))  # its argument
    run = await app.get_run(run_id)
    assert run.trace_id
    await expect(detail).to_contain_text(run.trace_id)
    await expect(detail).to_contain_text(run.steps[0].attempts[0].worker or "no worker")
    await shot(page, "run")


async def _cancel_a_waiting_run(app: Engine, page: Page) -> None:
    run_id = page.url.rsplit("/", 1)[1].split("#")[0]
    await page.locator("#cancel").click()
    await expect(page.locator(".notice")).to_have_text("Cancelled.")
    await expect(page.locator("h1 .status")).to_have_text("CANCELLED")
    assert (await app.get_run(run_id)).status is RunStatus.CANCELLED


async def _rerun_a_failed_run_from_a_step(
    app: Engine, page: Page, url: str, broken: dict[str, bool]
) -> None:
    [event_id] = await app.send(Event(name="t/fragile"))
    failed = await only_run_id(app, event_id)
    assert (await app.wait_for_run(failed)).status is RunStatus.FAILED
    await page.goto(f"{url}/runs/{failed}")
    await expect(page.locator("h1 .status")).to_have_text("FAILED")
    await expect(page.locator("pre.error").first).to_contain_text("the second step is broken")
    broken["second"] = False  # the bug is fixed: rerun from the step that failed
    await page.locator("#from-step").select_option("second")
    await page.locator("#rerun-from").click()
    await expect(page.locator(".notice")).to_contain_text(f"Rerun of {failed} from step second")
    new_id = page.url.split("?")[0].rsplit("/", 1)[1]
    assert new_id != failed
    # The page follows the run until it ends (it reloads as the run moves).
    await expect(page.locator("h1 .status")).to_have_text("COMPLETED")
    rerun, original = await app.get_run(new_id), await app.get_run(failed)
    assert rerun.output == 2
    kept = [step.attempts for step in rerun.steps if step.step_id == "first"]
    assert kept == [original.steps[0].attempts]  # kept from the failed run, not run again


async def _send_events(app: Engine, page: Page, url: str) -> None:
    await page.goto(f"{url}/events")
    await page.keyboard.press("g")
    await page.keyboard.press("r")
    await expect(page).to_have_url(f"{url}/runs")
    await page.keyboard.press("g")
    await page.keyboard.press("e")
    await expect(page).to_have_url(f"{url}/events")

    send = page.locator("details.send")
    if await send.get_attribute("open") is None:
        await send.locator("summary").click()
    await page.locator("#send-form [name=name]").fill("t/pack")
    await page.locator("#send-form [name=data]").fill('{"n": ')
    await page.locator("#send").click()
    await expect(page.locator("#send-error")).to_contain_text("not JSON")

    await page.locator("#send-form [name=data]").fill('{"n": 42}')
    await page.locator("#send").click()
    await expect(page.locator(".notice")).to_have_text("Sent.")
    event_id = page.url.split("?")[0].rsplit("/", 1)[1]
    stored = await app.get_event(event_id)
    assert stored is not None and stored.data == {"n": 42}
    run_id = await only_run_id(app, event_id)

    # The Events page lists it live with the run it started.
    await page.goto(f"{url}/events")
    chip = page.locator(f'tr[data-href$="/events/{event_id}"] a.chip[href$="/runs/{run_id}"]')
    await expect(chip).to_be_visible(timeout=WAIT_MS)
    [later] = await app.send(Event(name="t/pack", data={"n": 43}))
    await expect(page.locator(f'tr[data-href$="/events/{later}"]')).to_be_visible(timeout=WAIT_MS)
    await shot(page, "events")

    async def done() -> bool:
        return (await app.wait_for_run(run_id)).status is RunStatus.COMPLETED

    await eventually(done)


# -- Functions, Workers, Bulk ----------------------------------------------------------------------
def ops_shop(app: Engine, gate: dict[str, Any]) -> None:
    """``hold``: one run at a time, its step held until ``gate["open"]`` is set; ``charge``:
    only invoked, returns its event's data; ``nightly``: a cron."""

    @app.create_function("hold", trigger=TriggerEvent("t/hold"), concurrency=Concurrency(limit=1))
    async def hold(ctx: Context) -> Any:
        return await ctx.step.run("held", gate["open"].wait)

    @app.create_function("charge")
    async def charge(ctx: Context) -> Any:
        return ctx.event.data

    @app.create_function("nightly", trigger=TriggerCron("TZ=Europe/Paris 0 3 * * *"))
    async def nightly(ctx: Context) -> None:
        return None


async def test_a_person_watches_functions_and_workers_invokes_and_cancels_in_bulk(
    make_engine: Any, browser: Browser
) -> None:
    """Runs parked on a concurrency limit appear live on the Functions page, the step held
    appears live on the Workers page; a function is invoked with a payload from its page; the
    parked runs are previewed and cancelled from the Bulk page."""
    gate = {"open": asyncio.Event()}
    app = make_engine("shop")
    ops_shop(app, gate)
    async with app.worker(poll_interval="100ms", lease="3s"):
        served = await start(create_app(app), host="127.0.0.1", port=0, token=None)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 800})
            await page.goto(f"{served.url}/functions")
            row = page.locator('tr[data-id="shop/hold"]')
            await expect(row).to_be_visible()
            await app.send([Event(name="t/hold") for _ in range(3)])
            await expect(row.locator(".chip", has_text="concurrency 2")).to_be_visible(
                timeout=WAIT_MS
            )  # without a reload
            await expect(row.locator("a.chip.s-running")).to_have_text("running 1")
            await shot(page, "functions")

            await page.keyboard.press("g")
            await page.keyboard.press("w")
            await expect(page).to_have_url(f"{served.url}/workers")
            await expect(page.locator(".chip", has_text="▶ held")).to_be_visible(timeout=WAIT_MS)
            await shot(page, "workers")

            await page.goto(f"{served.url}/functions/shop/nightly")
            await expect(page.locator("#next-fires li")).to_have_count(5)
            await page.goto(f"{served.url}/functions/shop/charge")
            await page.locator("#invoke-form [name=data]").fill('{"amount": 12}')
            await shot(page, "function")
            await page.locator("#invoke").click()
            await expect(page.locator(".notice")).to_have_text("Invoked charge.")
            await expect(page.locator("h1 .status")).to_have_text("COMPLETED", timeout=WAIT_MS)
            run = await app.get_run(page.url.split("?")[0].rsplit("/", 1)[1])
            assert run.output == {"amount": 12} and run.event.name == "engine/function.invoked"

            await page.goto(f"{served.url}/bulk")
            await page.locator("#filters [name=function]").select_option("hold")
            await page.locator("#filters [name=status]").select_option("QUEUED")
            await page.locator("#preview-button").click()
            await expect(page.locator("#match-count")).to_have_text("2")
            await shot(page, "bulk")
            await page.locator("#bulk-cancel").click()
            await expect(page.locator("#notice")).to_have_text(
                "Cancelling the matching runs in the background."
            )
            job = page.locator("#jobs tbody tr").first  # followed live
            await expect(job).to_have_class(re.compile(r"\bjob-done\b"))
            await expect(job.locator(".job-acted")).to_have_text("2")
            await shot(page, "bulk-done")
            await page.locator("#preview-button").click()
            await expect(page.locator("#match-count")).to_have_text("0")  # none QUEUED any more
            gate["open"].set()
            await page.close()
        finally:
            await served.stop()
