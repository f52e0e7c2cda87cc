"""A CPU smoke run of ``benchmarks/decode_profile.py``: it builds the model and experts, times
its bursts and returns the profiler's table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_profile.py"


def _bench() -> ModuleType:
    sys.path.insert(0, str(BENCHMARK.parent))  # it imports generation_throughput by folder
    spec = importlib.util.spec_from_file_location("decode_profile", BENCHMARK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_tiny_cpu_run_times_every_burst_and_returns_the_kernel_table() -> None:
    argv = "--preset tiny --device cpu --experts 2 --concurrency 3 --new-tokens 4"
    result = _bench().main([*argv.split(), "--prompt-tokens", "8", "--rows", "5"])
    assert len(result["walls"]) == 3 and all(w > 0 for w in result["walls"])
    assert result["tokens_per_s"] > 0
    assert "Name" in result["table"]
