"""Why the data-free routers (Arrow, PHATGOOSE) route as they do, on a set of trained experts.

Takes the expert folders a coordinator materialised (``<data-dir>/coordinator/
experts/<id>/``, e.g. after ``moerge demo`` or ``benchmarks/routing_quality.py --data-dir``),
routes each task's held-out test split (``datasets.load_task`` with the demo's seed) through
the in-process :class:`InferenceEngine` with ``module_mix``, the way ``Predict`` serves a token
router, and reports beside the oracle (each text to its own task's expert):

* routing accuracy per task (the expert with the largest total routing weight is the text's
  own; that expert's head answers) and task accuracy as a share of the oracle's;
* per expert, the norm of its LoRA update ``||s B A||_F`` and of its PHATGOOSE gates, averaged
  over modules, and whether the router knows nothing about it (``zero_vector_experts``: a zero
  update gives a zero Arrow prototype and leaves the gates at their zero start).

Prints markdown; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from moerge.base_model import default_base_model
from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.coordinator.services.expert_store import read_lora, read_statistics
from moerge.datasets import load_task
from moerge.router_training.base import ExpertRecord
from moerge.router_training.fitting import fit_router


def expert_folders(root: Path) -> dict[str, Path]:
    """Task name -> expert folder (one expert per task)."""
    return {
        json.loads((f / "statistics.json").read_text())["task_name"]: f
        for f in sorted(root.iterdir())
        if (f / "statistics.json").is_file()
    }


def test_stream(
    tasks: list[str], per_task: int, train_per_task: int, seed: int
) -> list[tuple[str, str, str]]:
    """``(task, text, label)`` of each task's held-out split (the split the experts' training
    run used: the same sizes and seed)."""
    rows = []
    for task in tasks:
        data = load_task(task, max_train=train_per_task, max_test=per_task, seed=seed)
        rows += [(task, e.text, e.label) for e in data.test]
    return rows


def score(
    engine: InferenceEngine,
    plan_of: dict[str, RoutingPlan] | RoutingPlan,
    rows: list[tuple[str, str, str]],
    batch: int = 16,
) -> tuple[dict[str, list[bool]], dict[str, list[bool]]]:
    """Per task, whether each text was routed to its own expert and answered right."""
    routed, right = defaultdict(list), defaultdict(list)
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        if isinstance(plan_of, dict):  # the oracle: one explicit plan per task
            preds = []
            for task, text, _ in chunk:
                preds += engine.predict([text], plan_of[task])
        else:
            preds = engine.predict([text for _, text, _ in chunk], plan_of)
        for (task, _, label), p in zip(chunk, preds, strict=True):
            routed[task].append(max(p.experts, key=lambda w: w.weight).expert_id == task)
            right[task].append(p.output == label)
    return routed, right


def mean(values: list[bool] | list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experts", type=Path, help="folder of expert folders")
    parser.add_argument("--test-per-task", type=int, default=40)
    parser.add_argument("--train-per-task", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="arrow,phatgoose")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    folders = expert_folders(args.experts)
    tasks = list(folders)
    records = [
        ExpertRecord(t, t, read_statistics(f), load_lora=lambda f=f: read_lora(f))
        for t, f in folders.items()
    ]
    rows = test_stream(tasks, args.test_per_task, args.train_per_task, args.seed)
    engine = InferenceEngine(
        default_base_model(), expert_loader=folders.__getitem__, max_length=128, truncate=True
    )
    lines = [f"experts: `{args.experts}`; {len(rows)} held-out texts, {len(tasks)} tasks", ""]
    lines += ["| expert | mean ‖s·B·A‖_F | mean ‖gate‖ |", "| --- | ---: | ---: |"]
    for record in records:
        lora = record.load_lora() if record.load_lora else {}
        updates = [float((w.B @ w.A).norm() * w.scaling) for w in lora.values()]
        gates = record.statistics.gates if record.statistics else {}
        gate_norm = mean([float(g.norm()) for g in gates.values()]) if gates else float("nan")
        lines.append(f"| {record.task_name} | {mean(updates):.3f} | {gate_norm:.3f} |")
    oracle = {t: RoutingPlan.explicit([[t]]) for t in tasks}
    _, oracle_right = score(engine, oracle, rows)
    oracle_acc = mean([x for v in oracle_right.values() for x in v])
    lines += [
        "",
        "| method | routing acc | task acc | % of oracle | zero-vector experts | "
        + " | ".join(tasks)
        + " |",
        "| --- | ---: | ---: | ---: | --- |" + " ---: |" * len(tasks),
    ]
    lines.append(f"| oracle | 100.0% | {oracle_acc:.1%} | 100.0% | - |" + " 100% |" * len(tasks))
    for method in args.methods.split(","):
        fit = fit_router(method, records)
        plan = RoutingPlan(aggregation=Aggregation.MODULE_MIX, router=fit.router)
        routed, right = score(engine, plan, rows)
        task_acc = mean([x for v in right.values() for x in v])
        blind = ", ".join(fit.router.zero_vector_experts()) or "none"  # type: ignore[attr-defined]
        per_task = " | ".join(f"{mean(routed[t]):.0%}" for t in tasks)
        lines.append(
            f"| {method} | {mean([x for v in routed.values() for x in v]):.1%} | "
            f"{task_acc:.1%} | {task_acc / oracle_acc:.1%} | {blind} | {per_task} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
