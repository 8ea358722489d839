"""The peers and the engine on the same server, in the same run: figures and our ratios.

    pip install -e '.[bench]'
    python bench/peers/run.py [--repeat 3]

Each peer runs in its own database of one embedded PostgreSQL (durable settings), `--repeat`
times; each figure is the median (with min and max). Our figures come from bench/core.py's
scenarios on the same server, between the peers' runs. Writes bench/results/peers.json.

Every peer's job or step here is an `async def` that does nothing, so our throughput and time
per step in the comparisons are those with `async def` step callables too; the figures with
plain `def` step callables (each run in a thread, as a blocking call must be) are printed
beside them.

PgQueuer records a job's completion in a buffer that it writes after ten completions or 0.1 s
(`JobStatusLogBuffer`, `max_size=batch_size`): its worker goes on to the next jobs before their
ends are committed, and a crash runs them again. Our steps are each committed before the next
one starts. The like-for-like figure beside it is ours with buffered checkpoints on the same
terms (`Checkpointing(buffered_steps=10, max_interval="100ms")`: a three-step run's steps are
committed with its end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

import core  # noqa: E402 - bench/core.py, next to this folder

from engine import Checkpointing  # noqa: E402
from engine.db import Database  # noqa: E402
from engine.logs import configure_logging  # noqa: E402

PEERS = {
    "dbos": ["dbos_bench.py"],
    "procrastinate": ["procrastinate_bench.py"],
    "pgqueuer": ["pgqueuer_bench.py"],
    "pgbench": ["pgbench_step.py", "--seconds", "10"],
}


# PgQueuer's terms for a job's end: written after ten of them or 0.1 s (see the docstring).
PGQUEUER_TERMS = Checkpointing(buffered_steps=10, max_interval="100ms")


def run_peer(script: list[str], url: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, str(HERE / script[0]), url, *script[1:]],
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


async def ours(url: str) -> dict[str, float]:
    engine_url = await core.fresh_database(url, "bench_engine")
    await Database(engine_url).apply_schema()
    latency = await core.latency(engine_url, 300)
    steps = await core.step_overhead(engine_url, 1000)
    async_steps = await core.step_overhead(engine_url, 1000, sync_steps=False)
    sync = await core.throughput(engine_url, 4000)
    asynchronous = await core.throughput(engine_url, 4000, sync_steps=False)
    buffered = await core.throughput(
        engine_url, 4000, sync_steps=False, checkpointing=PGQUEUER_TERMS
    )
    return {
        "latency_p50_ms": latency["p50_ms"],
        "latency_p99_ms": latency["p99_ms"],
        "ms_per_step": steps["ms_per_step"],
        "ms_per_step_async_steps": async_steps["ms_per_step"],
        "three_step_runs_per_s": sync["runs_per_s"],
        "three_step_runs_per_s_async_steps": asynchronous["runs_per_s"],
        "three_step_runs_per_s_buffered": buffered["runs_per_s"],
    }


# (our figure, the peer's figure, how the ratio reads: "higher" means ours / theirs). The
# peers' jobs and steps are async functions: our figures with async step callables.
RUNS_PER_S = "three_step_runs_per_s_async_steps"
MS_PER_STEP = "ms_per_step_async_steps"
COMPARISONS = [
    ("latency_p50_ms", "dbos", "direct_latency_p50_ms", "lower"),
    ("latency_p50_ms", "dbos", "queued_latency_p50_ms", "lower"),
    (RUNS_PER_S, "dbos", "three_step_workflows_per_s", "higher"),
    (MS_PER_STEP, "dbos", "ms_per_step", "lower"),
    ("latency_p50_ms", "procrastinate", "latency_p50_ms", "lower"),
    (RUNS_PER_S, "procrastinate", "jobs_per_s", "higher"),
    ("latency_p50_ms", "pgqueuer", "latency_p50_ms", "lower"),
    (RUNS_PER_S, "pgqueuer", "jobs_per_s", "higher"),
]


def ratio(mine: float, theirs: float, better: str) -> float:
    return mine / theirs if better == "higher" else theirs / mine


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure_logging("warning")
    with core.scratch_server("engine-bench-peers-") as url:  # stopped and removed at the end
        await measure(url, args.repeat)


async def measure(url: str, repeat: int) -> None:
    """Every peer and the engine, ``repeat`` times, on the server of ``url``; prints the table
    and writes bench/results/peers.json."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in [*PEERS, "engine"]}
    for _ in range(repeat):
        for name, script in PEERS.items():
            peer_url = await core.fresh_database(url, f"bench_{name}")
            samples[name].append(await asyncio.to_thread(run_peer, script, peer_url))
            print(name, json.dumps(samples[name][-1]), flush=True)
        samples["engine"].append(await ours(url))
        print("engine", json.dumps(samples["engine"][-1]), flush=True)
    figures = {name: core.summarize(runs) for name, runs in samples.items()}
    print("\nfigure (medians)                                  ours      peer      ratio")
    for mine, peer, theirs, better in COMPARISONS:
        a, b = figures["engine"][mine]["median"], figures[peer][theirs]["median"]
        label = f"{peer} {theirs}"
        print(f"{label:<48} {a:>8.2f}  {b:>8.2f}  {ratio(a, b, better):>6.1f}x")
    engine = figures["engine"]
    print(
        "ours with plain `def` step callables (each in a thread):"
        f" {engine['three_step_runs_per_s']['median']:.0f} runs/s,"
        f" {engine['ms_per_step']['median']:.3f} ms per step"
    )
    # PgQueuer's unit is a one-step job: our steps/s (three per run) against its jobs/s.
    jobs = figures["pgqueuer"]["jobs_per_s"]["median"]
    for terms, key in (
        ("each step committed before the next", RUNS_PER_S),
        ("buffered as PgQueuer's job ends", "three_step_runs_per_s_buffered"),
    ):
        steps = 3 * engine[key]["median"]
        print(f"steps/s ({terms}) / PgQueuer jobs/s: {steps:.0f} / {jobs:.0f}", end="")
        print(f" = {steps / jobs:.2f}x")
    pgbench = figures["pgbench"]
    print(
        "pgbench step-shaped transactions/s: "
        + ", ".join(
            f"{key.split('_')[0]} clients {value['median']:.0f}" for key, value in pgbench.items()
        )
    )
    result = {**await core.environment(url), "repeat": repeat, "figures": figures}
    out = HERE.parent / "results"
    out.mkdir(exist_ok=True)
    (out / "peers.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
