"""Every example runs under `engine dev` (embedded PostgreSQL) and prints what it promises."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_engine_dev

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


@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_example_runs_under_engine_dev(example: str, tmp_path: Path) -> None:
    result = run_engine_dev(example, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in EXPECTED[example]:
        assert line in result.stdout, result.stdout
    assert "lease_lost" not in result.stdout + result.stderr
