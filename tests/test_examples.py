"""Every example runs under `engine dev` (embedded PostgreSQL) and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

EXPECTED = {
    "order_flow.py": [
        "A-1: COMPLETED [reserve-stock, wait-for-payment, ship] order A-1 shipped (payment p-9)",
        "A-2: COMPLETED [reserve-stock, wait-for-payment, release-stock] order A-2 unpaid",
        "A-3: CANCELLED [reserve-stock, wait-for-payment]",
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
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "--log-level",
            "warning",
            "dev",
            str(ROOT / "examples" / example),
            "--data-dir",
            str(tmp_path / "pg"),
            "--poll-interval",
            "200ms",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for line in EXPECTED[example]:
        assert line in result.stdout, result.stdout
    assert "lease_lost" not in result.stdout + result.stderr
