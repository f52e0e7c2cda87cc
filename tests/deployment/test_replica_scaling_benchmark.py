"""``benchmarks/replica_scaling.py`` at its smallest setting, as a command: one inference
replica, a 2-second phase, its calls from two client processes, on the fallbacks a machine
without PostgreSQL and nginx uses (one SQLite file, the clients' round_robin policy), so the
benchmark keeps working there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.benchmark_scripts import load_benchmark

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "replica_scaling.py"


def test_one_replica_for_two_seconds_answers_every_call_and_writes_the_report(
    tmp_path: Path,
) -> None:
    report = tmp_path / "replica_scaling.md"
    command = [sys.executable, str(BENCHMARK), "--replicas", "1", "--seconds", "2"]
    command += ["--clients-per-replica", "4", "--experts", "2", "--output", str(report)]
    command += ["--registry", "sqlite", "--balancer", "round_robin", "--client-processes", "2"]
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    text = report.read_text()
    assert "4 closed-loop Predict calls in flight per replica served" in text
    assert "spread over 2 client processes in every phase" in text
    assert "registry: one SQLite file in WAL mode" in text
    assert "balancer: gRPC client-side round_robin" in text
    assert "cores, CPU only" in text and "command: `python benchmarks/replica_scaling.py" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1 | 4 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    requests, errors, per_second, ratio = int(cells[2]), cells[3], float(cells[4]), cells[5]
    assert requests > 0 and errors == "0" and per_second > 0
    assert ratio == "1.00x"  # the one phase is its own baseline
    per_batch = float(cells[10])  # from the replica's /metrics: batches and requests served
    assert 1.0 <= per_batch <= 4.0  # 4 calls in flight, so at most 4 per batch


def test_pinned_placement_gives_each_replica_a_core_of_its_own_and_the_clients_the_rest() -> None:
    import os

    import pytest

    module = load_benchmark("replica_scaling")
    cores = module.physical_cores()
    allowed = os.sched_getaffinity(0)
    assert set().union(*cores) == allowed  # every usable CPU, in exactly one group
    assert sum(len(group) for group in cores) == len(allowed)
    if len(cores) < 2:
        pytest.skip("one physical core: nothing to place apart")
    placement = module.Placement.plan(len(cores) - 1)
    assert placement.replicas == cores[:-1] and placement.clients == cores[-1]
    assert "replica 0:" in placement.describe()
    with pytest.raises(SystemExit, match="physical cores"):
        module.Placement.plan(len(cores))
