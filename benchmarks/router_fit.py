"""Fit time, artifact size and routing latency of every router, for 10 to 10,000 experts.

Synthetic experts with MiniLM shapes (:mod:`moerge.router_training.synthetic`): statistics with
H = 384 and a rank-16 covariance factor; PHATGOOSE gates and Arrow LoRAs (r = 8) on the query and
value projections of 6 layers (d = 384, 12 modules). Everything runs on 2 threads
(``torch.set_num_threads(2)``). Routing is timed after the embedding: a batch of 64 pooled
embeddings (example-level) or 64 x 128 tokens entering one module (token-level); we report the
median and the minimum of repeated calls (the machine may be shared; the minimum is the best
estimate of the uncontended cost).

Arrow's fit time includes generating its random adapters (the stand-in for reading them from
storage); the ``load`` column gives that part alone. A method is skipped at E = 10,000 when its
fit time extrapolated from E = 100 and 1,000 exceeds ``--skip-above`` seconds.

    .venv/bin/python benchmarks/router_fit.py            # full run, writes results/router_fit.md
    .venv/bin/python benchmarks/router_fit.py --quick    # E in {10, 100}, few repeats
"""

from __future__ import annotations

import os

# Threads that finish a parallel region sleep instead of spinning. On a machine shared with
# other jobs, spinning OpenMP threads make every small op wait for a descheduled partner (we
# measured 1.2 ms -> 125 ms per MLP training step with 2 threads at load 5). Must be set
# before torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from moerge.router_training import Router, fit_router
from moerge.router_training.base import ExpertRecord
from moerge.router_training.gaussian import GaussianBank
from moerge.router_training.synthetic import (
    MINILM_HIDDEN,
    minilm_modules,
    synthetic_gaussian_experts,
    synthetic_lora_experts,
)

THREADS = 2
BATCH = 64
TOKENS = 64 * 128
#: (label, method, params). Labels with a suffix are variants of one method.
METHODS: list[tuple[str, str, dict[str, object]]] = [
    ("centroid", "centroid", {}),
    ("lda", "lda", {}),
    ("qda", "qda", {}),
    ("mlp", "mlp", {}),
    ("phatgoose", "phatgoose", {}),
    ("arrow", "arrow", {}),
    ("arrow (svd)", "arrow", {"prototype_solver": "svd"}),
]
#: Variants timed for routing only (same fit): reduced-precision scores.
BF16_VARIANTS = {"centroid", "lda"}
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    label: str
    granularity: str
    num_experts: int
    fit_s: float | None = None
    load_s: float | None = None
    artifact_mb: float | None = None
    route_ms: tuple[float, float] | None = None  # (median, min)
    route_bf16_ms: tuple[float, float] | None = None
    accuracy: float | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 3) -> tuple[float, float]:
    """(median, min) wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def experts_for(method: str, num: int) -> list[ExpertRecord]:
    if method == "arrow":
        return synthetic_lora_experts(num, minilm_modules(), rank=8, seed=0)
    gates = None
    if method == "phatgoose":
        gates = {m: d_in for m, (d_in, _) in minilm_modules().items()}
    return synthetic_gaussian_experts(num, MINILM_HIDDEN, rank=16, seed=0, gate_modules=gates)


def routing_inputs(router: Router, experts: list[ExpertRecord]) -> torch.Tensor:
    if router.granularity == "token":
        return torch.randn(TOKENS, MINILM_HIDDEN, generator=torch.Generator().manual_seed(1))
    bank = GaussianBank.from_experts(experts)
    x, _ = bank.draw_labelled(BATCH, bank.prior_probs("uniform"), torch.Generator().manual_seed(1))
    return torch.nn.functional.normalize(x, dim=-1)  # inference embeddings are L2-normalised


def route_fn(router: Router, x: torch.Tensor) -> Callable[[], object]:
    if router.granularity == "token":
        module = router.modules[0]
        return lambda: router.route_tokens(module, x)
    return lambda: router.route_examples(x)


def run_one(label: str, method: str, params: dict[str, object], num: int, repeats: int) -> Row:
    experts = experts_for(method, num)
    row = Row(label, "", num)
    if method == "arrow":
        start = time.perf_counter()
        for e in experts:
            assert e.load_lora is not None
            e.load_lora()
        row.load_s = time.perf_counter() - start
    result = fit_router(method, experts, params)
    router = result.router
    row.granularity = router.granularity
    row.fit_s = result.fit_seconds
    row.accuracy = result.metrics.get("sample_accuracy")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "router.safetensors"
        router.save(path)
        row.artifact_mb = path.stat().st_size / 2**20
    x = routing_inputs(router, experts)
    if router.granularity == "token":  # one call is 8,192 tokens: fewer repeats suffice
        row.route_ms = time_calls(route_fn(router, x), max(3, repeats // 10), warmup=1)
    else:
        row.route_ms = time_calls(route_fn(router, x), repeats)
    if label in BF16_VARIANTS:
        fast = fit_router(
            method, experts, {**params, "score_dtype": "bfloat16"}, metric_samples=0
        ).router
        row.route_bf16_ms = time_calls(route_fn(fast, x), repeats)
    return row


def extrapolate(rows: list[Row], label: str, target: int) -> float | None:
    """Fit time at ``target`` experts from the two largest measured sizes (power law)."""
    points = sorted(
        (r.num_experts, r.fit_s)
        for r in rows
        if r.label == label and r.fit_s is not None and r.fit_s > 0
    )
    if len(points) < 2:
        return None
    (n1, t1), (n2, t2) = points[-2], points[-1]
    slope = max(1.0, math.log(t2 / t1) / math.log(n2 / n1))
    return t2 * (target / n2) ** slope


def growth(rows: list[Row], label: str, attr: str) -> str:
    points = sorted(
        (r.num_experts, getattr(r, attr))
        for r in rows
        if r.label == label and getattr(r, attr) is not None
    )
    points = [(n, v[1] if isinstance(v, tuple) else v) for n, v in points]
    points = [(n, v) for n, v in points if n >= 100 and v > 0]
    if len(points) < 2:
        return "n/a"
    (n1, v1), (n2, v2) = points[0], points[-1]
    return f"E^{math.log(v2 / v1) / math.log(n2 / n1):.2f}"


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_ms(value: tuple[float, float] | None) -> str:
    return "—" if value is None else f"{value[0]:.2f} / {value[1]:.2f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| method | routes | E | fit (s) | of which load (s) | artifact (MB) "
        "| route median / min (ms) | route bf16 median / min (ms) | sample acc | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.granularity or '—'} | {r.num_experts:,} | {fmt(r.fit_s)} "
            f"| {fmt(r.load_s)} | {fmt(r.artifact_mb, 1)} | {fmt_ms(r.route_ms)} "
            f"| {fmt_ms(r.route_bf16_ms)} | {fmt(r.accuracy, 3)} | {r.note} |"
        )
    return "\n".join(lines)


def growth_table(rows: list[Row]) -> str:
    lines = [
        "| method | fit time grows as | artifact grows as | routing time grows as |",
        "|---|---|---|---|",
    ]
    for label, _, _ in METHODS:
        cells = [growth(rows, label, attr) for attr in ("fit_s", "artifact_mb", "route_ms")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="E in {10, 100}, fewer repeats")
    parser.add_argument("--sizes", type=int, nargs="*", help="numbers of experts to run")
    parser.add_argument("--methods", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="routing timing repeats")
    parser.add_argument(
        "--skip-above",
        type=float,
        default=120.0,
        help="skip a size whose extrapolated fit time exceeds this (s)",
    )
    parser.add_argument("--output", type=Path, default=None, help="markdown file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    sizes = args.sizes or ([10, 100] if args.quick else [10, 100, 1000, 10000])
    repeats = args.repeats or (10 if args.quick else 50)
    output = args.output or RESULTS / ("router_fit_quick.md" if args.quick else "router_fit.md")
    methods = [m for m in METHODS if not args.methods or m[0] in args.methods]
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows: list[Row] = []
    for label, method, params in methods:
        for num in sizes:
            predicted = extrapolate(rows, label, num)
            if predicted is not None and predicted > args.skip_above:
                note = f"skipped: fit extrapolated to ~{predicted:.0f} s > {args.skip_above:.0f} s"
                rows.append(Row(label, "", num, note=note))
            else:
                rows.append(run_one(label, method, params, num, repeats))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    command = "python " + " ".join(["benchmarks/router_fit.py", *(argv or sys.argv[1:])])
    report = "\n".join(
        [
            "# Router fit benchmark",
            "",
            f"- command: `{command}`",
            f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- torch {torch.__version__}, {THREADS} threads "
            f"(`torch.set_num_threads({THREADS})`), CPU: {cpu_model()}, {os.cpu_count()} cores",
            f"- load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} "
            "(other jobs share this machine; compare the min routing times); "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
            f"- total wall time: {elapsed:.0f} s",
            "- experts: synthetic, H = 384, covariance rank 16; Arrow: r = 8 LoRAs on query/value "
            "of 6 layers (12 modules, d = 384); PHATGOOSE: 12 gate vectors of 384",
            f"- routing: batch of {BATCH} embeddings (example-level) or {TOKENS:,} tokens in one "
            "module (token-level), after the embedding; default configs (top_k: 1 for statistics "
            "routers, 2 PHATGOOSE, 3 Arrow)",
            "- sample acc: top-1 routing accuracy on 2,048 draws from the experts' Gaussians "
            "(fit metric of `fit_router`)",
            "",
            table(rows),
            "",
            "Growth between the smallest and largest measured E >= 100 (log-log slope):",
            "",
            growth_table(rows),
            "",
        ]
    )
    print()
    print(report)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report, encoding="utf-8")
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
