"""A CPU smoke run of ``benchmarks/decode_profile.py``: it builds the model and experts, times
its bursts and returns the profiler's table."""

from __future__ import annotations

from types import ModuleType

from tests.benchmark_scripts import load_benchmark


def _bench() -> ModuleType:
    return load_benchmark("decode_profile")


def test_a_tiny_cpu_run_times_every_burst_and_returns_the_kernel_table() -> None:
    argv = "--preset tiny --device cpu --experts 2 --concurrency 3 --new-tokens 4"
    result = _bench().main([*argv.split(), "--prompt-tokens", "8", "--rows", "5"])
    assert len(result["walls"]) == 3 and all(w > 0 for w in result["walls"])
    assert result["tokens_per_s"] > 0
    assert "Name" in result["table"]
