"""Generalization to unseen instruction tasks with a causal LM: leave one task out.

The causal-LM half of ``benchmarks/generalization.py`` (issue 21's third item, "instruction
tasks whose answers are text"). The base model is SmolLM2-135M-Instruct (:mod:`moerge.smollm2`,
converted offline) and the tasks are the LLM demo's one-word-answer instruction tasks
(:mod:`moerge.datasets.instruction_tasks`), prompts in the model's chat template:

* ``word_class``: an English word -> noun, verb, adjective or adverb (options in the question);
* ``news_topic``: the start of a BBC story -> business, entertainment, politics, sports or tech;
* ``review_verdict``: a Rotten Tomatoes snippet -> fresh or rotten;
* ``noun_category``: a WordNet noun gloss -> one of 26 supersenses (options *not* listed).

Unlike the classification benchmark the tasks share no output space: what an expert of one task
can lend another is the answer's *form* (one word from the options, then stop) and whatever it
learnt about reading such prompts. The survey's question is the same: does routing an unseen
task's prompts among the experts of other tasks beat the base model and a uniform merge?

One LoRA expert per task (``q_proj``/``v_proj``, r=8, the LLM demo's contributor settings, with
PHATGOOSE gates) is trained in this process and kept in ``--work-dir``, so a rerun skips
training. For each held-out task, with only the *other three* experts:

* **base**: the base model, no expert (the prompt asks for one word and names the options);
* **uniform merge**: ``(1/3) sum_j B_j A_j``;
* **each router** over the three remaining experts (centroid and LDA read statistics of the
  contributors' prompts; Arrow and PHATGOOSE only the weights and gates) with its default
  aggregation (token routing for Arrow and PHATGOOSE, routed on every generated token);
* **few-shot composition** at k = 5, 20, 50 training examples of the held-out task: LoraHub's
  search (:mod:`moerge.router_training.composition`) over the coordinator's causal-LM objective
  (the answers' mean negative log-likelihood per token, :mod:`moerge.coordinator.inference.
  composition_objective`);
* **best single remaining expert**, chosen with hindsight on the test set;
* **own expert**: the held-out task's own expert (the ceiling).

Scored by exact match of the normalised answer (:func:`moerge.answers.answers_match`), and
leniently by whether the first option the answer names is the right one, which gives the base
model's sentences their due. Writes ``benchmarks/results/generalization_llm.md``. Run with
``OMP_NUM_THREADS=2`` on the 2-core box (about 35 minutes with the defaults, half of it
training the experts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from moerge.answers import answers_match, first_option_named
from moerge.client_training import TrainOptions, build, train_config
from moerge.coordinator.inference.composition_objective import composition_plan, generation_loss
from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.datasets import TaskData
from moerge.llm_demo import LORA_TARGETS, load_chat_task
from moerge.router_training.composition import CompositionConfig, search_weights
from moerge.router_training.fitting import fit_router
from moerge.smollm2 import ensure_converted

sys.path.insert(0, str(Path(__file__).resolve().parent))  # generalization, by folder

from generalization import log, record

TASKS = ("word_class", "news_topic", "review_verdict", "noun_category")
ROUTERS = ("centroid", "lda", "arrow", "phatgoose")
DATA_FREE = ("arrow", "phatgoose")  # routers that read only the experts' weights and gates
SHOTS = (5, 20, 50)
RESULTS = Path(__file__).parent / "results" / "generalization_llm.md"


# -- experts ---------------------------------------------------------------------------------------
def train_experts(
    work: Path, model_dir: Path, tasks: dict[str, TaskData], args: argparse.Namespace
) -> dict[str, Path]:
    """One expert per task with the LLM demo's contributor settings (and PHATGOOSE gates)."""
    folders = {}
    for name, data in tasks.items():
        folder = work / "experts" / name
        folders[name] = folder
        if (folder / "statistics.json").exists():
            continue
        path = work / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in data.train)
        )
        options = TrainOptions(
            task_type="causal_lm",
            epochs=args.epochs,
            rank=8,
            learning_rate=2e-3,
            batch_size=8,
            max_length=128,
            target_modules=list(LORA_TARGETS),
            gate_steps=args.gate_steps,
        )
        started = time.perf_counter()
        config = train_config(str(model_dir), None, options)
        build(path, folder, name, data.description, options, config, None, False)
        log(f"trained {name} in {time.perf_counter() - started:.0f} s")
    return folders


# -- scoring ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """Exact match and option-named accuracy of one method on one held-out task."""

    exact: float
    named: float


@dataclass
class Row:
    task: str
    scores: dict[str, Score]
    seconds: dict[int, float]


def shots(data: TaskData, k: int, seed: int) -> list[tuple[str, str]]:
    """``k`` training examples of the held-out task (seeded)."""
    pairs = [(e.text, e.label) for e in data.train]
    return random.Random(seed).sample(pairs, min(k, len(pairs)))


def evaluate_task(
    engine: InferenceEngine,
    held_out: str,
    folders: dict[str, Path],
    tasks: dict[str, TaskData],
    args: argparse.Namespace,
) -> Row:
    data = tasks[held_out]
    prompts, gold = [e.text for e in data.test], [e.label for e in data.test]
    rest = [n for n in folders if n != held_out]

    def run(plan: RoutingPlan) -> Score:
        outputs = [p.output for p in engine.predict(prompts, plan, args.max_new_tokens)]
        exact = sum(answers_match(o, y) for o, y in zip(outputs, gold, strict=True))
        named = sum(
            first_option_named(o, data.label_names) == y for o, y in zip(outputs, gold, strict=True)
        )
        return Score(exact / len(gold), named / len(gold))

    records = [record(n, folders[n]) for n in rest]
    scores: dict[str, Score] = {
        "base model (no expert)": run(RoutingPlan.routed(fit_router("base", records).router)),
        "uniform merge": run(
            RoutingPlan.explicit([rest] * len(prompts), None, Aggregation.MERGE_LINEAR)
        ),
    }
    for method in ROUTERS:
        scores[method] = run(RoutingPlan.routed(fit_router(method, records).router))
    singles = {n: run(RoutingPlan.explicit([[n]] * len(prompts))) for n in rest}
    best = max(singles, key=lambda n: singles[n].exact)
    scores["best single (hindsight)"] = singles[best]
    scores["own expert (ceiling)"] = run(RoutingPlan.explicit([[held_out]] * len(prompts)))
    seconds: dict[int, float] = {}
    for k in SHOTS:
        results, secs = [], []
        for seed in range(args.seeds):
            examples = shots(data, k, seed)
            loss = generation_loss(engine, rest, [t for t, _ in examples], [y for _, y in examples])
            config = CompositionConfig(budget=args.budget, time_limit_s=args.time_limit, seed=seed)
            found = search_weights(loss, len(rest), config)
            results.append(run(composition_plan(rest, found.weights, len(prompts))))
            secs.append(found.elapsed_s)
            log(
                f"  {held_out} k={k} seed={seed}: weights {[round(w, 2) for w in found.weights]}"
                f" ({rest}) loss {found.start_loss:.3f} -> {found.loss:.3f}, test exact "
                f"{results[-1].exact:.3f}, {found.elapsed_s:.0f} s"
            )
        scores[f"composition k={k}"] = Score(
            sum(r.exact for r in results) / len(results),
            sum(r.named for r in results) / len(results),
        )
        seconds[k] = sum(secs) / len(secs)
    log(f"{held_out}: " + ", ".join(f"{m} {s.exact:.3f}/{s.named:.3f}" for m, s in scores.items()))
    return Row(held_out, scores, seconds)


# -- report ---------------------------------------------------------------------------------------
def _table(rows: list[Row], metric: str) -> list[str]:
    methods = list(rows[0].scores)
    lines = [
        "| method | " + " | ".join(r.task for r in rows) + " | mean |",
        "| --- | " + " | ".join("---:" for _ in rows) + " | ---: |",
    ]
    for m in methods:
        values = [getattr(r.scores[m], metric) for r in rows]
        cells = " | ".join(f"{100 * v:.1f}" for v in values)
        lines.append(f"| {m} | {cells} | {100 * sum(values) / len(values):.1f} |")
    return lines


def report(
    rows: list[Row], args: argparse.Namespace, sizes: dict[str, tuple[int, int]], seconds: float
) -> str:
    methods = list(rows[0].scores)
    mean = {m: sum(r.scores[m].exact for r in rows) / len(rows) for m in methods}
    best_router = max(ROUTERS, key=lambda m: mean[m])
    best_data_free = max(DATA_FREE, key=lambda m: mean[m])
    best_zero = max(["base model (no expert)", "uniform merge", *ROUTERS], key=lambda m: mean[m])
    own, k20 = mean["own expert (ceiling)"], mean["composition k=20"]
    gap = own - mean[best_zero]
    recovered = (k20 - mean[best_zero]) / gap if gap > 0 else float("nan")
    secs = {k: sum(r.seconds[k] for r in rows) / len(rows) for k in SHOTS}
    command = (
        "OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generalization_llm.py "
        f"--max-train {args.max_train} --max-test {args.max_test} --epochs {args.epochs} "
        f"--gate-steps {args.gate_steps} --seeds {args.seeds} --budget {args.budget}"
    )
    return "\n".join(
        [
            "# Generalization to unseen instruction tasks (causal LM, leave one task out)",
            "",
            f"Command: `{command}`",
            f"Machine: shared 2-core CPU (other jobs running), torch {torch.__version__}; "
            f"wall time {seconds / 60:.1f} min.",
            "",
            "Sizes (train / test prompts): "
            + ", ".join(f"{n} {a} / {b}" for n, (a, b) in sizes.items())
            + f". Experts: SmolLM2-135M-Instruct + LoRA r=8 on q_proj/v_proj, {args.epochs} "
            f"epochs, lr 2e-3, batch 8, {args.gate_steps} gate steps. Greedy answers of at most "
            f"{args.max_new_tokens} tokens. Composition: budget {args.budget} evaluations of "
            "the answers' mean negative log-likelihood per token on the k examples, L1 0.05, "
            f"CMA-ES, mean over {args.seeds} draws of the examples.",
            "",
            "Exact match (%) on each held-out task, routed among the *other three* experts:",
            "",
            *_table(rows, "exact"),
            "",
            "The first option named (%), the lenient metric:",
            "",
            *_table(rows, "named"),
            "",
            f"- Best router over the remaining experts (exact match): **{best_router}** "
            f"({100 * mean[best_router]:.1f}% mean) against the base model "
            f"{100 * mean['base model (no expert)']:.1f}% and the uniform merge "
            f"{100 * mean['uniform merge']:.1f}%; best weights-only router (arrow/phatgoose): "
            f"{best_data_free} {100 * mean[best_data_free]:.1f}%.",
            f"- Best zero-shot method: {best_zero} ({100 * mean[best_zero]:.1f}%); own expert "
            f"{100 * own:.1f}%; composition k=20 {100 * k20:.1f}%: it recovers "
            f"**{100 * recovered:.0f}%** of the gap (goal: >= 50%).",
            "- Search time per composition (mean): "
            + ", ".join(f"k={k} {s:.1f} s" for k, s in secs.items())
            + ".",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/moerge-generalization-llm"))
    parser.add_argument("--max-train", type=int, default=64)
    parser.add_argument("--max-test", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=2, help="the LLM demo's")
    parser.add_argument("--gate-steps", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--model-dir", type=Path, default=None, help="default: SmolLM2")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    model_dir = args.model_dir or ensure_converted()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tasks = {
        n: load_chat_task(tokenizer, n, max_train=args.max_train, max_test=args.max_test)
        for n in args.tasks
    }
    sizes = {n: (len(d.train), len(d.test)) for n, d in tasks.items()}
    log(f"sizes {sizes}")
    folders = train_experts(args.work_dir, model_dir, tasks, args)
    engine = InferenceEngine(
        model_dir,
        task_type="causal_lm",
        target_modules=list(LORA_TARGETS),
        max_length=256,
        max_new_tokens=args.max_new_tokens,
        expert_loader=lambda e: folders[e],
    )
    try:
        rows = [evaluate_task(engine, n, folders, tasks, args) for n in args.tasks]
    finally:
        engine.close()
    text = report(rows, args, sizes, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
