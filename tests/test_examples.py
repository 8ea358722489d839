"""Every example runs under `engine dev` (embedded PostgreSQL) and prints what it promises, and
its functions pass their unit tests written with the testing kit (``run_function``).

As a newcomer runs them: one after the other in the same folder (so in the same ./.engine),
the README's quickstart first and again last. What one demo leaves in the database (durable
time it moved, functions it registered) must not break the next.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from helpers import EXAMPLES, remove_folder, run_engine_dev, scratch_dir

from engine import Event, RunStatus
from engine.testing import run_function

EXPECTED = {
    "order_flow.py": [
        "A-1: COMPLETED [reserve-stock, wait-for-payment, ship] order A-1 shipped (payment p-9)",
        "A-2: COMPLETED [reserve-stock, wait-for-payment, release-stock] order A-2 unpaid",
        "A-3: CANCELLED [reserve-stock, wait-for-payment]",
    ],
    "rate_limited_sync.py": [
        "ada  COMPLETED x2",
        "ada  SKIPPED   x1",
        "cy   SKIPPED   x2",
        "why skipped: rate limit: 2 runs already started in the last 60.0 seconds",
        "all 10 settled",
    ],
    "signup_drip.py": [
        "run COMPLETED: ['welcome sent', 'getting-started-tips sent', 'need-a-hand sent']",
        "sleep  wait-three-days  COMPLETED",
    ],
    "daily_report.py": ["T08:00:00", "-> run COMPLETED: report for"],
    "fan_out.py": [
        "import COMPLETED: 20 row events, summary {'rows': 20, 'units': 210}",
        "20 row runs completed",
    ],
}


QUICKSTART = ["COMPLETED", '"receipt": "welcome mail sent to ada@example.com"']


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    """The folder every example of this module runs in, one after the other."""
    path = scratch_dir("examples-")
    yield path
    remove_folder(path)


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ("quickstart.py", QUICKSTART),
        *[(name, lines) for name, lines in sorted(EXPECTED.items())],
        ("quickstart.py", QUICKSTART),
    ],
)
def test_example_runs_under_engine_dev(example: str, expected: list[str], folder: Path) -> None:
    result = run_engine_dev(example, folder)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in expected:
        assert line in result.stdout, result.stdout
    assert "lease_lost" not in result.stdout + result.stderr


def test_examples_run_one_after_another_on_one_database(dev_dir: Path) -> None:
    """Under `engine dev`, one example's functions do not catch the next one's events: after
    signup_drip (a `signup-drip` on user/signed-up, sleeping for days) stopped, quickstart's
    user/signed-up starts only its own function, and the other way round."""
    for example in ("signup_drip.py", "quickstart.py", "signup_drip.py"):
        result = run_engine_dev(example, dev_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        for line in EXPECTED.get(example, ["COMPLETED"]):
            assert line in result.stdout, result.stdout


# -- each example's functions, unit-tested with the testing kit (docs/testing.md) ------------------
def example(name: str) -> ModuleType:
    """Imports examples/NAME.py (a script, not a package) as ``example_NAME``."""
    module_name = f"example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[module_name] = module
    return sys.modules[module_name]


async def test_quickstart_welcomes_the_user(engine_database_url: str) -> None:
    quickstart = example("quickstart")
    run = await run_function(
        quickstart.welcome_user,
        Event(name="user/signed-up", data={"user_id": "u-1", "plan": "pro"}),
        steps={"fetch-user": {"id": "u-1", "name": "Bo", "email": "bo@example.com"}},
    )
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"user": "Bo", "receipt": "welcome mail sent to bo@example.com"}


@pytest.mark.parametrize(
    ("payment", "last_step", "output"),
    [
        (
            Event(name="shop/payment.succeeded", data={"order_id": "A-1", "payment_id": "p-1"}),
            "ship",
            "order A-1 shipped (payment p-1)",
        ),
        (None, "release-stock", "order A-1 unpaid after 24h: stock released"),
    ],
)
async def test_order_flow_ships_paid_orders_and_releases_unpaid_ones(
    engine_database_url: str, payment: Event | None, last_step: str, output: str
) -> None:
    order_flow = example("order_flow")
    run = await run_function(
        order_flow.order_flow,
        Event(name="shop/order.created", data={"order_id": "A-1", "items": ["mug"]}),
        events={"wait-for-payment": payment},
    )
    assert run.status is RunStatus.COMPLETED, run.error
    assert [s.step_id for s in run.steps] == ["reserve-stock", "wait-for-payment", last_step]
    assert run.output == output


@pytest.mark.parametrize(("activated", "emails"), [(True, 2), (False, 3)])
async def test_signup_drip_nudges_only_users_who_did_not_activate(
    engine_database_url: str, activated: bool, emails: int
) -> None:
    """Four days of sleeps pass at once; the activation check is mocked both ways."""
    signup_drip = example("signup_drip")
    run = await run_function(
        signup_drip.signup_drip,
        Event(name="user/signed-up", data={"user_id": "u-1", "email": "ada@example.com"}),
        steps={"check-activation": activated},
    )
    assert run.status is RunStatus.COMPLETED, run.error
    assert len(run.output) == emails


async def test_fan_out_sends_one_event_per_row_and_invokes_the_summary(
    engine_database_url: str,
) -> None:
    fan_out = example("fan_out")
    rows = [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 3}]
    run = await run_function(
        fan_out.start_import,
        Event(name="import/requested", data={"rows": rows}),
        functions=[fan_out.summarize],
    )
    assert run.status is RunStatus.COMPLETED, run.error
    assert len(run.output["row_event_ids"]) == 2
    assert run.output["summary"] == {"rows": 2, "units": 5}


async def test_rate_limited_sync_pushes_a_contact(engine_database_url: str) -> None:
    crm = example("rate_limited_sync")
    event = Event(name="crm/contact.updated", data={"user_id": "ada", "fields": {"plan": "pro"}})
    run = await run_function(crm.sync_contact, event)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == "pushed 1 field(s) for ada"
