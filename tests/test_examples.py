"""Every example runs under `engine dev` (embedded PostgreSQL) and prints what it promises.

As a newcomer runs them: one after the other in the same folder (so in the same ./.engine),
the README's quickstart first and again last. What one demo leaves in the database (durable
time it moved, functions it registered) must not break the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import remove_folder, run_engine_dev, scratch_dir

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
