"""Routing and task accuracy of the statistics routers at each DP epsilon.

The statistics a contributor releases are computed from the base model's embeddings of its
data; the adapter does not depend on the statistics' epsilon. So every expert is trained once
(non-private, the default recipe), each test example's prediction by every expert is taken
once, and for each epsilon in ``--epsilons`` (``none`` = no DP) and each of ``--draws`` noise
draws the statistics of every task are released again, the statistics routers (centroid, LDA,
QDA, MLP) fitted from them alone, and the mixed held-out stream routed top-1:

* routing accuracy: the share of test examples routed to their own task's expert;
* task accuracy: the share answered correctly by the expert they were routed to (what
  ``moerge demo`` reports; a misrouted example is right only if the other expert happens to
  give its label).

The pipeline is that of ``moerge contribute`` and the coordinator minus the processes: the same
``pooled_embeddings`` (MiniLM), ``summarize_embeddings`` (the DP release) and
``fit_router``. Writes ``benchmarks/results/dp_statistics.md``.

    OMP_NUM_THREADS=2 python benchmarks/dp_statistics.py --train-per-task 200 --test-per-task 100
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics as pystats
import sys
import time
from pathlib import Path

import torch

from moerge.base_model import default_base_model
from moerge.contributor_client.batching import load_tokenizer
from moerge.contributor_client.privacy import NOISE_RATIOS, RELEASES, DPConfig, noise_multiplier
from moerge.contributor_client.statistics import summarize_embeddings
from moerge.datasets import load_task
from moerge.demo import DEFAULT_TASKS
from moerge.embedding import pooled_embeddings
from moerge.router_training.base import ExpertRecord, ExpertStatistics
from moerge.router_training.fitting import fit_router

ROUTERS = ("centroid", "lda", "qda", "mlp")
RESULTS = Path(__file__).parent / "results" / "dp_statistics.md"
DELTA = 1e-5


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def embed(base: str, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base, dtype=torch.float32)
    return pooled_embeddings(model, load_tokenizer(base), texts)


def expert_predictions(
    base: str, tasks: list, cache: Path, epochs: int, test_texts: list[str]
) -> tuple[torch.Tensor, list[list[str]], float]:
    """Train one default-recipe expert per task (cached) and predict every test text with each.

    Returns [E, N] predicted label index per expert, each expert's label names, seconds.
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from moerge.contributor_client.batching import collate, encode, sorted_batches
    from moerge.contributor_client.recipe import TrainConfig
    from moerge.contributor_client.training import train_expert

    started = time.perf_counter()
    tokenizer = load_tokenizer(base)
    token_ids = encode(tokenizer, test_texts, 128)
    predictions, names = [], []
    for task in tasks:
        folder = cache / task.name
        if not (folder / "adapter_model.safetensors").is_file():
            log(f"training the {task.name} expert ({len(task.train)} examples)")
            result = train_expert(
                [e.text for e in task.train],
                [e.label for e in task.train],
                TrainConfig(base_model=base, epochs=epochs),
                folder,
                progress=False,
            )
            (folder / "labels.txt").write_text("\n".join(result.label_names))
        labels = (folder / "labels.txt").read_text().split("\n")
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(labels), dtype=torch.float32
        )
        model = PeftModel.from_pretrained(model, str(folder)).eval()
        out = torch.empty(len(test_texts), dtype=torch.long)
        with torch.inference_mode():
            for rows in sorted_batches([len(t) for t in token_ids], 64):
                batch = collate([token_ids[r] for r in rows], tokenizer)
                out[rows] = model(**batch).logits.argmax(dim=-1)
        predictions.append(out)
        names.append(labels)
    return torch.stack(predictions), names, time.perf_counter() - started


def release(
    train: list[torch.Tensor],
    label_ids: list[list[int]],
    sizes: list[int],
    epsilon: float | None,
    seed: int,
) -> list[ExpertRecord]:
    records = []
    for t, (x, ids, size) in enumerate(zip(train, label_ids, sizes, strict=True)):
        dp = None if epsilon is None else DPConfig(epsilon=epsilon, delta=DELTA, seed=seed * 97 + t)
        s = summarize_embeddings(x, ids, size, dp=dp)
        records.append(
            ExpertRecord(
                expert_id=f"e{t}",
                task_name=str(t),
                statistics=ExpertStatistics(
                    example_count=s.count,
                    mean=s.mean.float(),
                    cov_diag=s.cov_diag.float(),
                    cov_factor=s.cov_factor.float(),
                    dp_noise_std=s.noise_std,
                ),
            )
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-per-task", type=int, default=200)
    parser.add_argument("--test-per-task", type=int, default=100)
    parser.add_argument("--epsilons", default="none,8,4,2,1")
    parser.add_argument("--draws", type=int, default=5, help="noise draws per epsilon")
    parser.add_argument("--experts", action="store_true", help="train experts: task accuracy")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--attack-trials", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache/dp_statistics"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = default_base_model()
    started = time.perf_counter()
    tasks = [
        load_task(name, max_train=args.train_per_task, max_test=args.test_per_task)
        for name in DEFAULT_TASKS
    ]
    test_texts = [e.text for task in tasks for e in task.test]
    test_task = torch.tensor([t for t, task in enumerate(tasks) for _ in task.test])
    cache = args.cache / f"n{args.train_per_task}"
    cache.mkdir(parents=True, exist_ok=True)
    emb_file = cache / f"embeddings-test{args.test_per_task}.pt"
    if emb_file.is_file():
        train, test = torch.load(emb_file)
    else:
        log(f"embedding {sum(len(t.train) for t in tasks)} + {len(test_texts)} texts")
        train = [embed(base, [e.text for e in task.train]) for task in tasks]
        test = embed(base, test_texts)
        torch.save((train, test), emb_file)
    label_ids = []
    for task in tasks:
        names = sorted({e.label for e in task.train})
        label_ids.append([names.index(e.label) for e in task.train])
    sizes = [max(ids) + 1 for ids in label_ids]

    correct_if = None  # [E, N]: expert e answers test example n correctly
    expert_seconds = 0.0
    if args.experts:
        predicted, names, expert_seconds = expert_predictions(
            base, tasks, cache / "experts", args.epochs, test_texts
        )
        truth = [e.label for task in tasks for e in task.test]
        correct_if = torch.tensor(
            [
                [names[e][int(p)] == truth[n] for n, p in enumerate(row)]
                for e, row in enumerate(predicted)
            ]
        )

    epsilons = [None if e == "none" else float(e) for e in args.epsilons.split(",")]
    rows = []
    for epsilon in epsilons:
        draws = 1 if epsilon is None else args.draws
        routing = {m: [] for m in ROUTERS}
        task_acc = {m: [] for m in ROUTERS}
        for seed in range(draws):
            records = release(train, label_ids, sizes, epsilon, seed)
            for method in ROUTERS:
                router = fit_router(method, records, metric_samples=0).router
                chosen = router.route_examples(test).indices[:, 0]
                routing[method].append(float((chosen == test_task).float().mean()))
                if correct_if is not None:
                    hit = correct_if[chosen, torch.arange(len(chosen))]
                    task_acc[method].append(float(hit.float().mean()))
        z = None if epsilon is None else noise_multiplier(epsilon, DELTA)
        for method in ROUTERS:
            rows.append((epsilon, z, method, routing[method], task_acc[method]))
        best = max(ROUTERS, key=lambda m: pystats.mean(routing[m]))
        log(
            f"epsilon {epsilon}: best {best} {100 * pystats.mean(routing[best]):.1f}% "
            + " ".join(f"{m}={100 * pystats.mean(routing[m]):.1f}" for m in ROUTERS)
        )
    oracle = (
        None
        if correct_if is None
        else float(correct_if[test_task, torch.arange(len(test_task))].float().mean())
    )
    attacks = membership(train, test, test_task, epsilons, args.attack_trials)
    write(args, rows, oracle, expert_seconds, time.perf_counter() - started, attacks)


def membership(train, test, test_task, epsilons, trials: int) -> list[tuple]:
    """Both attacks of :mod:`membership` on real embeddings (the first task's; the population
    attack on a release of 50 examples, against held-out texts of the same task)."""
    from moerge.contributor_client.membership import population_attack, worst_case_attack

    rows = []
    data = train[0]
    held_out = test[test_task == 0]
    members, reference = data[:50], data[50:]
    for epsilon in epsilons:
        config = None if epsilon is None else DPConfig(epsilon=epsilon, delta=DELTA)
        worst = worst_case_attack(data[1:], data[0], config, trials=trials if config else 20)
        population = population_attack(
            members, held_out[:50], reference, config, releases=1 if config is None else 40
        )
        rows.append((epsilon, worst, population))
        log(
            f"attacks at epsilon {epsilon}: worst case {worst.advantage:.3f}, "
            f"population {population.advantage:.3f}"
        )
    return rows


def _pct(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * pystats.mean(values)
    if len(values) == 1:
        return f"{mean:.1f}%"
    return f"{mean:.1f}% +- {100 * pystats.stdev(values):.1f}"


def write(args, rows, oracle, expert_seconds: float, seconds: float, attacks=()) -> None:
    lines = [
        "# DP statistics: routing and task accuracy per epsilon",
        "",
        f"`{' '.join(['python', *sys.argv])}`",
        "",
        f"5 tasks ({', '.join(DEFAULT_TASKS)}), {args.train_per_task} training examples per "
        f"task (one contributor each), a mixed stream of {args.test_per_task} held-out examples "
        f"per task, routed top-1; delta {DELTA:g}, clip norm 1, the {len(RELEASES)} releases "
        f"composed by the PLD accountant, noise multipliers {':'.join(RELEASES)} = "
        f"{':'.join(f'{NOISE_RATIOS[r]:g}' for r in RELEASES)}, the second moment's "
        f"off-diagonal noise 1/sqrt(2) of its diagonal's; {args.draws} noise draws per epsilon "
        f"(mean +- std over draws). "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {seconds:.0f} s"
        + (f" (experts {expert_seconds:.0f} s)" if expert_seconds else "")
        + ".",
        "",
        "| epsilon | second moment's noise multiplier z | router | routing acc | task acc |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for epsilon, z, method, routing, task in rows:
        eps = "none" if epsilon is None else f"{epsilon:g}"
        lines.append(
            f"| {eps} | {'-' if z is None else f'{z:.2f}'} | {method} | "
            f"{_pct(routing)} | {_pct(task)} |"
        )
    if oracle is not None:
        lines += [
            "",
            f"Oracle routing (every example to its own task's expert): task accuracy "
            f"{100 * oracle:.1f}%.",
        ]
    best_none = max((pystats.mean(r) for e, _, _, r, _ in rows if e is None), default=math.nan)
    lines += [
        "",
        f"Loss of the best statistics router against the best without DP ({100 * best_none:.1f}%):",
        "",
    ]
    for epsilon in sorted({e for e, *_ in rows if e is not None}):
        best = max(pystats.mean(r) for e, _, _, r, _ in rows if e == epsilon)
        lines.append(f"* epsilon {epsilon:g}: {100 * (best_none - best):+.1f} points")
    if attacks:
        lines += [
            "",
            "Membership inference on the first task's real embeddings "
            "(`moerge.contributor_client.membership`): *worst case*, the attacker of the DP "
            f"definition (knows the other {args.train_per_task - 1} examples, likelihood-ratio "
            f"test on the raw releases, {args.attack_trials} trials), beside the exact advantage "
            "of the optimal test and the (epsilon, delta) bound; *population*, an attacker who "
            "knows only other texts of the task, on a release of 50 examples (40 releases; "
            "50 members vs 50 held-out texts).",
            "",
            "| epsilon | worst-case advantage | exact (optimal test) | DP bound | "
            "population advantage (n=50) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for epsilon, worst, population in attacks:
            eps = "none" if epsilon is None else f"{epsilon:g}"
            bound = "-" if worst.dp_bound is None else f"{worst.dp_bound:.4f}"
            lines.append(
                f"| {eps} | {worst.advantage:.3f} +- {worst.standard_error:.3f} | "
                f"{worst.exact:.3f} | {bound} | {population.advantage:.3f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if args.out.is_file() and os.environ.get("DP_BENCH_APPEND") else "w"
    with open(args.out, mode) as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
