"""A short run of ``benchmarks/load_test.py``: 8 Predict clients and 2 uploaders for 5 s.

Zero errors of any status code, and the adapter cache within its budget: over it at most by
what one micro-batch pins (the cache's documented exception), and back under it once idle.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

PREDICTORS, EXPERTS, RANK = 8, 8, 8


def _load_test_module():
    return load_benchmark("load_test")


def test_short_load_has_no_errors_and_keeps_the_cache_within_budget(
    tmp_path: Path, tiny_bert: Path
) -> None:
    load_test = _load_test_module()
    per_expert = load_test.expert_bytes(tiny_bert, RANK)
    budget = per_expert * 3
    report = load_test.run_load(
        tiny_bert,
        tmp_path,
        seconds=5,
        predictors=PREDICTORS,
        uploaders=2,
        experts=EXPERTS,
        cache_bytes=budget,
        rank=RANK,
    )
    assert report.errors == 0, (report.predict_errors, report.upload_errors)
    assert report.predictions > 0 and report.uploads > 0
    assert report.cache_budget_bytes == budget
    assert report.cache_loads > 3 and report.cache_evictions > 0  # it had to evict
    assert report.cache_max <= max(budget, PREDICTORS * per_expert)  # one batch's pins at most
    assert report.cache_after_bytes <= budget


@pytest.mark.soak
def test_full_load_for_60_seconds_has_no_errors(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_bert: Path
) -> None:
    """The benchmark's own load: 32 Predict clients and 8 uploaders over 40 experts, 60 s."""
    if "soak" not in (request.config.option.markexpr or ""):  # as tests/fuzz does
        pytest.skip("60 s load: run with -m soak")
    load_test = _load_test_module()
    per_expert = load_test.expert_bytes(tiny_bert, RANK)
    budget = per_expert * 10
    report = load_test.run_load(
        tiny_bert,
        tmp_path,
        seconds=60,
        predictors=32,
        uploaders=8,
        experts=40,
        cache_bytes=budget,
        rank=RANK,
    )
    assert report.errors == 0, (report.predict_errors, report.upload_errors)
    assert report.cache_max <= max(budget, 32 * per_expert)
    assert report.cache_after_bytes <= budget
