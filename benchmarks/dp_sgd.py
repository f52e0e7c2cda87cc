"""Expert accuracy with DP-SGD (Opacus) at epsilon 4 and 8 against the non-private expert,
with training time and a loss-threshold membership-inference attack on each.

Per task: the default recipe without DP (LP-FT, early stopping), then DP training
(:mod:`moerge.contributor_client.dp_sgd`'s defaults: the head alone over frozen features
centred at the empty text's, released as noisy class prototypes, one full-batch Gaussian step;
the DP-SGD run on the head (Poisson batches of 256, clipping at 1, AdamW, at least 150 steps)
with ``--sgd-epsilons``; head + LoRA with ``--lora-epsilons``; the whole epsilon on the
adapter, no gates) at each epsilon, each DP variant ``--dp-runs`` times (fresh noise each time:
the prototypes' noise is seeded from the OS's entropy), reported as the mean and range.
Accuracy is on the task's held-out test split; the attack (Yeom et al. 2018) compares the
loss of ``--attack`` training members with that of as many test examples.
Writes ``benchmarks/results/dp_sgd.md``.

    OMP_NUM_THREADS=1 python benchmarks/dp_sgd.py --tasks bbc_news rotten_tomatoes --train 600 \
        --dp-runs 3 --sgd-epsilons 8,4
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moerge.base_model import default_base_model
from moerge.contributor_client.batching import collate, encode, load_tokenizer, sorted_batches
from moerge.contributor_client.dp_sgd import DPSGDConfig
from moerge.contributor_client.membership import loss_attack
from moerge.contributor_client.privacy import bound_advantage
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.training import train_expert
from moerge.datasets import load_task

RESULTS = Path(__file__).parent / "results" / "dp_sgd.md"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def losses(
    folder: Path,
    base: str,
    labels: list[str],
    texts: list[str],
    targets: list[str],
    max_length: int,
) -> tuple[float, torch.Tensor]:
    """Accuracy and per-example loss of the saved expert on ``texts``."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), dtype=torch.float32
    )
    model = PeftModel.from_pretrained(model, str(folder)).eval()
    ids = encode(tokenizer, texts, max_length)
    y = torch.tensor([labels.index(t) for t in targets])
    out = torch.empty(len(texts))
    correct = 0
    with torch.inference_mode():
        for rows in sorted_batches([len(t) for t in ids], 64):
            logits = model(**collate([ids[r] for r in rows], tokenizer)).logits
            out[rows] = F.cross_entropy(logits, y[rows], reduction="none")
            correct += int((logits.argmax(-1) == y[rows]).sum())
    return correct / len(texts), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "bbc_news"])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--epsilons", default="8,4")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--attack", type=int, default=200)
    parser.add_argument(
        "--sgd-epsilons",
        default="",
        help="also the DP-SGD run on the head (head_mechanism='sgd') at these epsilons",
    )
    parser.add_argument("--dp-runs", type=int, default=1, help="runs of each DP variant")
    parser.add_argument(
        "--lora-epsilons",
        default="",
        help="also DP-SGD on head + LoRA (train_lora) at these epsilons",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    base = default_base_model()
    started = time.perf_counter()
    rows = []
    for name in args.tasks:
        task = load_task(name, max_train=args.train, max_test=args.test)
        texts, labels = [e.text for e in task.train], [e.label for e in task.train]
        test_texts, test_labels = [e.text for e in task.test], [e.label for e in task.test]
        k = min(args.attack, len(texts), len(test_texts))
        variants: list[tuple[str, DPSGDConfig | None]] = [("none", None)] + [
            (eps, DPSGDConfig(epsilon=float(eps))) for eps in args.epsilons.split(",")
        ]
        variants += [
            (f"{eps} (DP-SGD head)", DPSGDConfig(epsilon=float(eps), head_mechanism="sgd"))
            for eps in args.sgd_epsilons.split(",")
            if eps
        ]
        variants += [
            (f"{eps} (head + LoRA)", DPSGDConfig(epsilon=float(eps), train_lora=True))
            for eps in args.lora_epsilons.split(",")
            if eps
        ]
        baseline = None
        for label, dp_sgd in variants:
            runs = []
            for _ in range(1 if dp_sgd is None else args.dp_runs):
                config = TrainConfig(
                    base_model=base, epochs=args.epochs, max_length=args.max_length
                )
                with tempfile.TemporaryDirectory() as tmp:
                    log(f"{name}: training, DP epsilon {label}")
                    begin = time.perf_counter()
                    result = train_expert(texts, labels, config, tmp, progress=False, dp_sgd=dp_sgd)
                    seconds = time.perf_counter() - begin
                    accuracy, test_loss = losses(
                        Path(tmp),
                        base,
                        result.label_names,
                        test_texts,
                        test_labels,
                        args.max_length,
                    )
                    _, train_loss = losses(
                        Path(tmp),
                        base,
                        result.label_names,
                        texts[:k],
                        labels[:k],
                        args.max_length,
                    )
                attack = loss_attack(train_loss, test_loss[:k])
                runs.append((accuracy, seconds, attack))
                log(f"  accuracy {accuracy:.3f}, {seconds:.0f} s, attack advantage {attack:.3f}")
            accuracies = [r[0] for r in runs]
            accuracy = sum(accuracies) / len(runs)
            seconds = sum(r[1] for r in runs) / len(runs)
            attack = max(r[2] for r in runs)
            if baseline is None:
                baseline = (accuracy, seconds)
            account = result.dp_sgd
            rows.append(
                (
                    name,
                    len(task.label_names),
                    label,
                    accuracy,
                    (min(accuracies), max(accuracies), len(runs)),
                    accuracy / baseline[0],
                    seconds,
                    seconds / baseline[1],
                    attack,
                    None if account is None else account.noise_multiplier,
                    None if account is None else account.steps,
                    None if dp_sgd is None else bound_advantage(dp_sgd.epsilon, dp_sgd.delta),
                )
            )
    write(args, rows, time.perf_counter() - started)


def write(args, rows, seconds: float) -> None:
    dp = DPSGDConfig(epsilon=1.0)
    lines = [
        "# DP-SGD experts: accuracy, training time and a membership attack",
        "",
        f"`{' '.join(['python', *sys.argv])}`",
        "",
        f"{args.train} training examples per task (10% held out for validation), "
        f"{args.test} test examples, {args.epochs} epochs, max length {args.max_length} tokens, "
        f"delta 1e-5, MiniLM, no gates. DP: the head alone; by default (`prototypes`) one "
        "Gaussian release of the class sums of the centred features scaled to norm 1; "
        f"`DP-SGD head`: at least {dp.min_steps} steps of expected batch {dp.batch_size}, clip "
        f"{dp.max_grad_norm}, AdamW {dp.learning_rate:g}. Each DP variant run {args.dp_runs} "
        "time(s) with fresh noise: test accuracy is the mean (range in brackets), the attack "
        f"advantage the largest. Attack: loss threshold on {args.attack} members vs as many "
        f"test examples. torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} "
        f"cores, load average {os.getloadavg()[0]:.1f} at the end; {seconds:.0f} s in all.",
        "",
        "| task | labels | DP epsilon | noise multiplier | steps | test acc | of non-private "
        "| train time | time ratio | attack advantage | DP bound |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for task, n_labels, eps, acc, spread, rel, secs, ratio, attack, sigma, steps, bound in rows:
        low, high, count = spread
        span = f" ({100 * low:.1f}-{100 * high:.1f}%)" if count > 1 else ""
        lines.append(
            f"| {task} | {n_labels} | {eps} | {'-' if sigma is None else f'{sigma:.2f}'} | "
            f"{'-' if steps is None else steps} | {100 * acc:.1f}%{span} | {100 * rel:.0f}% | "
            f"{secs:.0f} s | {ratio:.2f}x | {attack:.3f} | "
            f"{'-' if bound is None else f'{bound:.3f}'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
