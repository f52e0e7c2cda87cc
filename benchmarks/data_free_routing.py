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
  update gives a zero Arrow prototype and leaves the gates at their zero start);
* with ``--token-centroid-bound``, what PHATGOOSE's scoring can do when its vectors are
  informative: each expert's "gate" at module ``m`` replaced by the mean of the standardised
  base-model inputs ``z(h)`` of that module over the task's training texts (a statistic of the
  data, so not a data-free router; it separates the scoring scheme's limit from the gates').

Prints markdown; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from moerge.base_model import default_base_model
from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.coordinator.services.expert_store import read_lora, read_statistics
from moerge.datasets import load_task
from moerge.router_training.base import ExpertRecord
from moerge.router_training.fitting import fit_router
from moerge.router_training.phatgoose import standardise


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


def token_centroids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    modules: list[str],
    texts: list[str],
    max_length: int = 128,
) -> dict[str, torch.Tensor]:
    """Per module, the mean over ``texts``' tokens of the standardised input ``z(h)`` [d_in]
    (``z`` as in :mod:`moerge.router_training.phatgoose`), read with pre-hooks on the base
    ``model``'s modules (paths as the gates are keyed, e.g.
    ``encoder.layer.0.attention.self.query``).
    """
    found = dict(model.named_modules())
    missing = [m for m in modules if m not in found]
    if missing:
        raise ValueError(f"modules not in the base model: {missing[:5]}")
    sums: dict[str, torch.Tensor] = {}
    counts = 0
    mask: torch.Tensor | None = None

    def hook(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            assert mask is not None
            z = standardise(args[0].detach(), eps=1e-5)[mask]  # [tokens, d_in]
            sums[name] = sums.get(name, 0) + z.sum(dim=0)

        return record

    handles = [found[m].register_forward_pre_hook(hook(m)) for m in modules]
    try:
        with torch.no_grad():
            for start in range(0, len(texts), 32):
                batch = tokenizer(
                    texts[start : start + 32],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                )
                mask = batch["attention_mask"].bool()
                counts += int(mask.sum())
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {m: sums[m] / counts for m in modules}


def with_token_centroid_gates(
    records: list[ExpertRecord], base_model: str | Path, train: dict[str, list[str]]
) -> list[ExpertRecord]:
    """The records with each expert's gates replaced by its task's token centroids (the base
    model loaded once)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModel.from_pretrained(base_model).eval()
    out = []
    for record in records:
        stats = record.statistics
        assert stats is not None and stats.gates, f"{record.expert_id}: no gates to replace"
        gates = token_centroids(model, tokenizer, sorted(stats.gates), train[record.task_name])
        out.append(dataclasses.replace(record, statistics=dataclasses.replace(stats, gates=gates)))
    return out


def mean(values: list[bool] | list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experts", type=Path, help="folder of expert folders")
    parser.add_argument("--test-per-task", type=int, default=40)
    parser.add_argument("--train-per-task", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="arrow,phatgoose")
    parser.add_argument(
        "--token-centroid-bound",
        action="store_true",
        help="also route by PHATGOOSE's scoring over the tasks' token centroids (uses data)",
    )
    parser.add_argument(
        "--target-modules",
        default="query,value",
        help="the modules the experts' LoRA adapts (the coordinator's target_modules)",
    )
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
        default_base_model(),
        expert_loader=folders.__getitem__,
        target_modules=args.target_modules.split(","),
        max_length=128,
        truncate=True,
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
    runs = [(m, m, records) for m in args.methods.split(",")]
    if args.token_centroid_bound:
        train = {
            t: [
                e.text
                for e in load_task(
                    t, max_train=args.train_per_task, max_test=args.test_per_task, seed=args.seed
                ).train
            ]
            for t in tasks
        }
        bound = with_token_centroid_gates(records, default_base_model(), train)
        runs.append(("token centroids, PHATGOOSE scoring (uses data)", "phatgoose", bound))
    for label, method, fitted_on in runs:
        fit = fit_router(method, fitted_on)
        plan = RoutingPlan(aggregation=Aggregation.MODULE_MIX, router=fit.router)
        routed, right = score(engine, plan, rows)
        task_acc = mean([x for v in right.values() for x in v])
        blind = ", ".join(fit.router.zero_vector_experts()) or "none"  # type: ignore[attr-defined]
        per_task = " | ".join(f"{mean(routed[t]):.0%}" for t in tasks)
        lines.append(
            f"| {label} | {mean([x for v in routed.values() for x in v]):.1%} | "
            f"{task_acc:.1%} | {task_acc / oracle_acc:.1%} | {blind} | {per_task} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
