"""A short run of ``benchmarks/predict_overhead.py``: both servers answer every call, and the
report gives the ratio, the latencies, the server's CPU per call (and per thread) and the
engine's batch size."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmark_scripts import load_benchmark


def _bench() -> ModuleType:
    return load_benchmark("predict_overhead")


@pytest.mark.parametrize(
    ("traced_forwards", "predict_process"),
    [(False, False), (True, False), (False, True)],
    ids=["eager", "traced", "engine-process"],
)
def test_a_short_run_measures_both_servers_without_errors(
    tmp_path: Path, traced_forwards: bool, predict_process: bool
) -> None:
    bench = _bench()
    args = argparse.Namespace(
        seconds=1.0, clients=4, experts=2, rank=4, batch_wait_ms=None, unset_env=[]
    )
    args.traced_forwards = traced_forwards
    args.predict_process = predict_process
    phases, model, batch = bench.run(args, tmp_path)
    assert [p.name for p in phases] == ["echo", "Predict", "echo"]
    for phase in phases:
        assert phase.latencies_ms and not phase.errors
        assert phase.server_cpu_seconds > 0
    assert batch >= 1.0  # parsed from the coordinator's shutdown line
    assert model.batch_ms > 0 and model.single_ms > 0 and model.contended_batch_ms > 0
    loop, model_thread, _ = phases[1].thread_cpu_seconds  # Predict: both threads worked
    assert loop > 0 and model_thread > 0
    report = bench.markdown(phases, model, batch, args)
    assert "Predict / echo" in report and "server CPU per request" in report
    assert "By thread, per Predict" in report
    assert ("traced forwards" in report) == traced_forwards
    # the engine process's CPU is the server's too, and reported on its own
    assert (phases[1].engine_cpu_seconds > 0) == predict_process
    assert ("the engine process (`predict_process`)" in report) == predict_process
