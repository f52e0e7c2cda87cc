"""Expert quality: the default training recipe against a linear probe and the majority.

For each public task of the demo (:mod:`moerge.datasets`) and each training
size, on the task's fixed test split:

* **default**: ``train_expert`` with :class:`TrainConfig`'s defaults (LP-FT, LoRA learning
  rate with warm-up + decay, ``min_steps``, class weights, early stopping on the validation
  split);
* **legacy**: the default recipe before LP-FT (``RECIPES["legacy"]``: random head, fixed epochs);
* **probe**: a logistic regression (``fit_linear_probe``, C = 1) on the frozen base model's
  pooled embeddings (what the classification head reads) of the same training examples;
* **majority**: always the most common training label.

Both recipes see the same examples (the expert holds ``validation_fraction`` of them out for
validation; the probe is fitted on all of them). Training time is each recipe's wall time in the
same run; the legacy time leaves out the probe fit that training now always does for its report,
so the ratio is against the old code's work. Writes ``benchmarks/results/expert_quality.md``
(rows are appended as they finish). Run with ``OMP_NUM_THREADS=2`` on the 2-core box.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from moerge.base_model import default_base_model
from moerge.contributor_client.batching import encode, load_tokenizer
from moerge.contributor_client.linear_probe import fit_linear_probe, pooled_features
from moerge.contributor_client.recipe import RECIPES, TrainConfig
from moerge.contributor_client.training import load_task_model, train_expert
from moerge.contributor_client.training_loop import evaluate
from moerge.datasets import TASKS, available_tasks, load_task

RESULTS = Path(__file__).parent / "results" / "expert_quality.md"


def expert_test_accuracy(
    base: str, out: Path, names: list[str], test_ids: list[list[int]], test_y: list[int]
) -> float:
    """Test accuracy of the saved expert, reloaded from its folder with PEFT."""
    tokenizer = load_tokenizer(base)
    model = PeftModel.from_pretrained(
        load_task_model(base, "classification", names, tokenizer), str(out)
    )
    indices = list(range(len(test_ids)))
    return evaluate(model, tokenizer, test_ids, test_y, indices, 32, causal_lm=False)[0]


def run_one(
    base: str, task: str, size: int, max_test: int, epochs: int, recipes: list[str]
) -> dict[str, float]:
    data = load_task(task, max_train=size, max_test=max_test, seed=0)
    names = data.label_names
    index = {name: i for i, name in enumerate(names)}
    texts = [e.text for e in data.train]
    labels = [e.label for e in data.train]
    tokenizer = load_tokenizer(base)
    test_ids = encode(tokenizer, [e.text for e in data.test], 128)
    test_y = [index[e.label] for e in data.test]
    train_y = torch.tensor([index[label] for label in labels])

    row: dict[str, float] = {"train": len(texts), "test": len(test_y), "labels": len(names)}
    counts = torch.bincount(train_y, minlength=len(names))
    row["majority"] = sum(y == int(counts.argmax()) for y in test_y) / len(test_y)

    begin = time.perf_counter()
    model = load_task_model(base, "classification", names, tokenizer)
    train_ids = encode(tokenizer, texts, 128)
    features = pooled_features(model, tokenizer, train_ids, list(range(len(train_ids))), 32)
    weight, bias = fit_linear_probe(features, train_y, len(names))
    test_features = pooled_features(model, tokenizer, test_ids, list(range(len(test_ids))), 32)
    predicted = (test_features @ weight.T + bias).argmax(dim=-1)
    row["probe"] = float((predicted == torch.tensor(test_y)).float().mean())
    row["probe_s"] = time.perf_counter() - begin

    for recipe in recipes:
        config = dataclasses.replace(TrainConfig(base_model=base, epochs=epochs), **RECIPES[recipe])
        with tempfile.TemporaryDirectory() as tmp:
            result = train_expert(texts, labels, config, tmp, progress=False)
            row[f"{recipe}_acc"] = expert_test_accuracy(base, Path(tmp), names, test_ids, test_y)
        probe_share = result.probe_seconds if recipe == "legacy" else 0.0
        row[f"{recipe}_s"] = result.seconds - probe_share
        row[f"{recipe}_steps"] = len(result.train_loss_curve)
        row[f"{recipe}_val"] = result.val_accuracy or 0.0
        row[f"{recipe}_best"] = -1 if result.best_step is None else result.best_step
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--sizes", nargs="*", type=int, default=[200, 600])
    parser.add_argument("--max-test", type=int, default=400, help="test examples per task")
    parser.add_argument("--epochs", type=int, default=3, help="both recipes' epochs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--recipes",
        nargs="*",
        choices=["legacy", "default"],
        default=["legacy", "default"],
        help="recipes to train (without legacy: no time ratio; its columns show '-')",
    )
    args = parser.parse_args()
    if "default" not in args.recipes:
        parser.error("--recipes must include default")
    base = default_base_model()
    tasks = [t for t in args.tasks if t in available_tasks()]
    missing = sorted(set(args.tasks) - set(tasks))
    header = [
        "# Expert quality: default recipe vs linear probe vs majority",
        "",
        f"Command: `{' '.join(['python', *sys.argv])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; base model MiniLM-L6 "
        f"(`{Path(base).name}`); epochs {args.epochs}; test capped at {args.max_test}.  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min).  ",
        f"Tasks missing here (data not fetched): {missing or 'none'}",
        "",
        "Test accuracy; time = training wall time (legacy without the probe fit it now does for "
        "its report); ratio = default / legacy time in the same run; best = optimizer step of the "
        "checkpoint early stopping restored (0: the probe itself, refitted on all examples).",
        "",
        "| task | train | labels | majority | probe | legacy | **default** | default - probe "
        "| legacy s | default s | ratio | steps legacy/default | best |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header) + "\n", encoding="utf-8")
    print("\n".join(header), flush=True)
    rows = []
    for size in args.sizes:
        for task in tasks:
            r = run_one(base, task, size, args.max_test, args.epochs, args.recipes)
            rows.append(r)
            legacy_acc, legacy_s, ratio, legacy_steps = "-", "-", "-", "-"
            if "legacy_acc" in r:
                legacy_acc, legacy_s = f"{r['legacy_acc']:.3f}", f"{r['legacy_s']:.0f}"
                ratio = f"{r['default_s'] / r['legacy_s']:.2f}x"
                legacy_steps = str(int(r["legacy_steps"]))
            line = (
                f"| {task} | {int(r['train'])} | {int(r['labels'])} | {r['majority']:.3f} "
                f"| {r['probe']:.3f} | {legacy_acc} | **{r['default_acc']:.3f}** "
                f"| {100 * (r['default_acc'] - r['probe']):+.1f} pt | {legacy_s} "
                f"| {r['default_s']:.0f} | {ratio} | {legacy_steps}/{int(r['default_steps'])} "
                f"| {int(r['default_best'])} |"
            )
            print(line, flush=True)
            with args.out.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")
    if rows:
        gain = sum(r["default_acc"] - r["probe"] for r in rows) / len(rows)
        worst = min(r["default_acc"] - r["probe"] for r in rows)
        summary = f"\nMean default - probe: {100 * gain:+.1f} pt; worst row: {100 * worst:+.1f} pt"
        if "legacy" in args.recipes:
            legacy_gain = sum(r["legacy_acc"] - r["probe"] for r in rows) / len(rows)
            ratio = sum(r["default_s"] for r in rows) / sum(r["legacy_s"] for r in rows)
            summary += (
                f"; legacy - probe: {100 * legacy_gain:+.1f} pt; total training time default / "
                f"legacy: {ratio:.2f}x"
            )
        summary += ".\n"
        print(summary, flush=True)
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(summary)


if __name__ == "__main__":
    main()
