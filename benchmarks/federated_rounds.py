"""Federated router rounds: rounds to reach LDA's accuracy, and wall time per round.

Synthetic experts with MiniLM shapes (:mod:`moerge.router_training.synthetic`: H = 384, rank-16
covariance factors), one expert per simulated contributor; each contributor holds draws from its
expert's Gaussian, about ``--examples`` per contributor on average, split in proportion to the
experts' example counts (:func:`~moerge.router_training.federated.simulated_contributors`).
The federation starts from a deliberately weak router -- LDA with ``shrinkage=1``, i.e. a
nearest-mean router that ignores the covariance -- and we count the rounds until its accuracy
(held-out draws from the experts' prior mixture) reaches that of the full statistics (LDA)
router, and 99% of it. Every round samples all contributors, one local SGD step each (the
defaults of :class:`~moerge.router_training.federated_base.FederatedRouterConfig`).

Runtimes: ``inprocess`` (:class:`~moerge.router_training.federated_rounds.InProcessGrid`, the
default) and, with ``--simulation``, Flower's Simulation Engine on Ray (``flwr[simulation]``). In
process, one round is timed first and the setting runs as many rounds (up to ``--max-rounds``) as
fit in ``--budget`` seconds at that rate, in one call; the rounds it did not run are reported as
not reached within the rounds run (never extrapolated as reached). "pooled optimum acc" is the
router trained centrally to convergence on all contributors' data: what FedAvg approaches. The Ray
runtime starts Ray and the nodes on every call: it runs 1 round and then 3 rounds, and reports
their difference / 2 per round and the rest as start-up.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/federated_rounds.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/federated_rounds.py --contributors 10 --quick
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from moerge.router_training import fit_router
from moerge.router_training.federated import FederatedRouter, simulated_contributors
from moerge.router_training.federated_rounds import run_federated_rounds
from moerge.router_training.gaussian import GaussianBank
from moerge.router_training.synthetic import synthetic_gaussian_experts

RESULTS = Path(__file__).parent / "results" / "federated_rounds.md"


def accuracy(router: FederatedRouter, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((router.logits(x).argmax(-1) == y).float().mean())


def bench(
    num: int,
    examples: int,
    max_rounds: int,
    budget: float,
    backend: str,
    learning_rate: float,
    local_steps: int = 1,
    with_central: bool = True,
    extra: dict | None = None,
) -> dict:
    experts = synthetic_gaussian_experts(num, seed=0)
    bank = GaussianBank.from_experts(experts)
    x, y = bank.draw_labelled(4000, bank.prior_probs("counts"), torch.Generator().manual_seed(7))
    lda_acc = accuracy_of(fit_router("lda", experts, {}).router, x, y)
    contributors = simulated_contributors(bank, [e.expert_id for e in experts], examples, 3)
    params = {
        "shrinkage": 1.0,
        "calibrate": False,
        "learning_rate": learning_rate,
        "local_steps": local_steps,
        **(extra or {}),
    }
    router = fit_router("federated", experts, params).router
    assert isinstance(router, FederatedRouter)
    accs = [accuracy(router, x, y)]
    central = pooled_optimum(router, contributors, x, y) if with_central else float("nan")
    times: list[float] = []
    startup = 0.0
    if backend == "simulation":
        # Every call starts Ray and the nodes: time 1 and R rounds, and take the difference.
        rounds = max_rounds
        t0 = time.perf_counter()
        run_federated_rounds(router, contributors, 1, backend=backend)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        outcome = run_federated_rounds(
            router, contributors, rounds, backend=backend, evaluation=(x, y)
        )
        many = time.perf_counter() - t0
        per_round = (many - one) / max(rounds - 1, 1)
        times = [per_round] * rounds
        startup = one - per_round
        accs = [m["accuracy"] for m in outcome.round_metrics]
    if backend == "inprocess":
        # One call for all rounds (a call per round would restart the strategy -- and its
        # server optimiser state -- and repeat round 1's local mini-batches every round). The
        # first round alone sizes the number of rounds that fit in the budget.
        t0 = time.perf_counter()
        run_federated_rounds(router, contributors, 1, backend=backend)
        rounds = max(1, min(max_rounds, int(budget / (time.perf_counter() - t0))))
        t0 = time.perf_counter()
        outcome = run_federated_rounds(router, contributors, rounds, evaluation=(x, y))
        times = [(time.perf_counter() - t0) / rounds] * rounds  # includes the evaluation
        accs = [m["accuracy"] for m in outcome.round_metrics]
    reach = next((r for r, a in enumerate(accs) if a >= lda_acc), None)
    reach99 = next((r for r, a in enumerate(accs) if a >= 0.99 * lda_acc), None)
    return {
        "num": num,
        "backend": backend,
        "lda": lda_acc,
        "start": accs[0],
        "best": max(accs),
        "central": central,
        "final": accs[-1],
        "rounds_run": len(times),
        "reach": reach,
        "reach99": reach99,
        "round_s": sorted(times)[len(times) // 2] if times else float("nan"),
        "first_round_s": times[0] if times else float("nan"),
        "startup_s": startup,
        "examples": sum(len(c.embeddings) for c in contributors),
    }


def pooled_optimum(router: FederatedRouter, contributors, x, y) -> float:
    """Held-out accuracy of the router trained *centrally* to convergence on the pooled data
    (L-BFGS on the same cross-entropy): where FedAvg with one local step converges to."""
    probe = router.copy()
    z = (torch.cat([c.embeddings for c in contributors]) - probe.center) @ probe.whitener
    labels = torch.cat([c.labels(probe.expert_ids) for c in contributors])
    weight = probe.weight.clone().requires_grad_(True)
    bias = probe.bias.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy((z @ weight + bias) / probe.temperature, labels)
        loss.backward()
        return loss

    opt.step(closure)
    probe.set_arrays({"weight": weight.detach(), "bias": bias.detach()})
    return accuracy(probe, x, y)


def accuracy_of(router, x, y) -> float:
    with torch.no_grad():
        return float((router.route_examples(x, 1).indices[:, 0] == y).float().mean())


def fmt_reach(value: int | None, run: int) -> str:
    return str(value) if value is not None else f"not in {run}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contributors", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--examples", type=int, default=200, help="mean examples per contributor")
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--budget", type=float, default=180.0, help="seconds per setting")
    parser.add_argument(
        "--simulation",
        type=int,
        nargs="*",
        default=[],
        help="also time these contributor counts on Flower's Ray engine",
    )
    parser.add_argument("--learning-rate", type=float, default=2.0, help="local SGD step size")
    parser.add_argument("--local-steps", type=int, default=1, help="SGD steps per round")
    parser.add_argument(
        "--params",
        default="{}",
        help='extra federated router params as JSON, e.g. \'{"server_optimizer": "momentum"}\'',
    )
    parser.add_argument(
        "--central-max",
        type=int,
        default=100,
        help="compute the pooled (central) optimum up to this many contributors",
    )
    parser.add_argument("--append", action="store_true", help="add a section, keep the file")
    parser.add_argument("--quick", action="store_true", help="5 rounds, 30 s per setting")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.max_rounds, args.budget = 5, 30.0
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    rows = []
    settings = [(n, "inprocess") for n in args.contributors]
    settings += [(n, "simulation") for n in args.simulation]
    for n, backend in settings:
        rounds = args.max_rounds if backend == "inprocess" else min(args.max_rounds, 3)
        rows.append(
            bench(
                n,
                args.examples,
                rounds,
                args.budget,
                backend,
                args.learning_rate,
                args.local_steps,
                with_central=n <= args.central_max,
                extra=json.loads(args.params),
            )
        )
        print("row", rows[-1], flush=True)
    lines = [
        "| contributors | runtime | examples | LDA acc | pooled optimum acc | start acc | best acc "
        "| rounds to LDA acc | rounds to 99% | rounds run | s / round (median) | start-up s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['num']} | {r['backend']} | {r['examples']} | {r['lda']:.3f} | "
            f"{r['central']:.3f} | {r['start']:.3f} | {r['best']:.3f} | "
            f"{fmt_reach(r['reach'], r['rounds_run'])} | "
            f"{fmt_reach(r['reach99'], r['rounds_run'])} | {r['rounds_run']} | "
            f"{r['round_s']:.2f} | {r['startup_s']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    command = "OMP_NUM_THREADS=1 .venv/bin/python " + shlex.join(
        ["benchmarks/federated_rounds.py", *sys.argv[1:]]
    )
    header = (
        f"# Federated router rounds\n\nWritten by `benchmarks/federated_rounds.py` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f}.\n\nCommand: `{command}`\n\n"
    )
    if args.append and RESULTS.exists():
        section = f"\n## Variant\n\nCommand: `{command}`\n\n"
        RESULTS.write_text(RESULTS.read_text() + section + table + "\n")
    else:
        RESULTS.write_text(header + table + "\n")


if __name__ == "__main__":
    main()
