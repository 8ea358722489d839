"""ops/: the worker's alive file (what the Kubernetes liveness probe checks), and the compose
file and Kubernetes manifests, which cannot run here (no Docker, no cluster) but parse and agree
with each other and with the worker's options."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from helpers import eventually

from engine.durations import parse_duration

OPS = Path(__file__).parent.parent / "ops"


def _documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _worker_container() -> dict[str, Any]:
    [deployment] = _documents(OPS / "k8s" / "worker.yaml")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _option(args: list[str], name: str) -> str:
    [value] = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]
    return value


async def test_the_alive_file_is_rewritten_at_each_heartbeat(
    make_engine: Any, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """With alive_file, each heartbeat that reached the database rewrites the file with the
    worker's id: the worker's row is fresh as long as the file is."""
    alive = tmp_path / "engine-alive"
    app = make_engine()
    async with app.worker(alive_file=alive, inactive_after="600ms") as worker:

        async def written() -> bool:
            return alive.exists()

        await eventually(written)
        assert alive.read_text() == f"{worker.owner}\n"
        row = await sql.fetchrow(
            "SELECT expires_at > now() AS fresh FROM engine.workers WHERE owner = $1", worker.owner
        )
        assert row is not None and row["fresh"]
        first = alive.stat().st_mtime_ns

        async def rewritten() -> bool:
            return alive.stat().st_mtime_ns != first

        await eventually(rewritten)
    assert sorted(os.listdir(tmp_path)) == ["engine-alive"]  # written whole, then renamed


def test_the_liveness_probe_fails_on_a_stale_or_missing_file(tmp_path: Path) -> None:
    """The manifest's probe command passes on a fresh alive file, fails on one older than its
    limit, and on none."""
    probe = _worker_container()["livenessProbe"]["exec"]["command"]
    assert probe[0] == "python"
    alive = tmp_path / "engine-alive"
    path_index = probe.index("/tmp/engine-alive")
    command = [sys.executable, *probe[1:path_index], str(alive), *probe[path_index + 1 :]]
    assert _option(_worker_container()["args"], "alive-file") == "/tmp/engine-alive"

    def passes() -> bool:
        return subprocess.run(command, check=False, timeout=30).returncode == 0

    assert not passes()  # no file yet
    alive.write_text("owner\n")
    assert passes()
    long_ago = time.time() - float(probe[-1]) - 60
    os.utime(alive, (long_ago, long_ago))
    assert not passes()


def test_the_worker_manifest_gives_sigterm_its_grace() -> None:
    """Kubernetes waits longer than --grace before SIGKILL, and the probe tolerates more than
    one missed heartbeat (one per --lease)."""
    [deployment] = _documents(OPS / "k8s" / "worker.yaml")
    pod = deployment["spec"]["template"]["spec"]
    args = _worker_container()["args"]
    grace = parse_duration(_option(args, "grace")).total_seconds()
    assert pod["terminationGracePeriodSeconds"] > grace
    lease = parse_duration(_option(args, "lease")).total_seconds()
    probe = _worker_container()["livenessProbe"]
    assert float(probe["exec"]["command"][-1]) >= 3 * lease


def test_the_compose_file_runs_postgres_two_workers_the_dashboard_and_tracing() -> None:
    """compose.yaml parses, has its services, and its workers' health check is the Kubernetes
    probe, with a stop grace period longer than --grace."""
    [compose] = _documents(OPS / "compose.yaml")
    services = compose["services"]
    assert {"postgres", "migrate", "worker-1", "worker-2", "dashboard"} <= set(services)
    assert {"otel-collector", "jaeger"} <= set(services)
    probe = _worker_container()["livenessProbe"]["exec"]["command"]
    for name in ("worker-1", "worker-2"):
        worker = services[name]
        assert worker["healthcheck"]["test"] == ["CMD", *probe]
        grace = parse_duration(_option(worker["command"], "grace"))
        assert parse_duration(worker["stop_grace_period"]) > grace
    assert services["dashboard"]["command"][:2] == ["engine", "dashboard"]
    collector = yaml.safe_load(compose["configs"]["otel-collector"]["content"])
    assert "otlp/jaeger" in collector["service"]["pipelines"]["traces"]["exporters"]
    for manifest in (OPS / "k8s").glob("*.yaml"):
        assert _documents(manifest), manifest


def test_the_engine_app_used_by_compose_exists() -> None:
    """The workers of compose.yaml and k8s run an example that exists, holding one Engine."""
    target = _option(["--x=" + _worker_container()["args"][2]], "x")
    source = (OPS.parent / target).read_text()
    assert source.count("Engine(") == 1
