"""``moerge demo --llm``: routed generation from a real causal LM, end to end, on 2 CPU cores.

The same pipeline as :mod:`moerge.demo`, with SmolLM2-135M-Instruct (:mod:`moerge.smollm2`) as
the base model and instruction tasks (:mod:`~moerge.datasets.instruction_tasks`):

1. the coordinator serves ``task_type=causal_lm`` with LoRA on ``q_proj``/``v_proj``;
2. one contributor per task, each a separate process seeing only its ``data.jsonl`` of
   (chat prompt, answer) pairs, trains a causal-LM expert on the answer tokens, computes its
   statistics and uploads it;
3. routers are fitted from the uploads alone;
4. a shuffled mixed stream of held-out prompts goes to ``Predict`` (greedy generation) with each
   method: the oracle (each prompt to its own task's expert), the routers, the uniform merge and
   the base model without experts. Each answer is scored by exact match, and leniently by
   whether the first option it names is the right one.

Sizes are chosen so that the whole run takes a few minutes on 2 cores (see docs/demo.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from moerge.datasets import TaskData
    from moerge.evaluation import MethodScore

console = Console()

#: Router versions fitted (``base`` routes to no expert: the base model alone).
LLM_ROUTERS = ("centroid", "arrow", "uniform", "base")
#: LoRA targets the coordinator allows and contributors adapt.
LORA_TARGETS = ("q_proj", "v_proj")
#: Tokens per training example (prompt + answer; the demo's prompts are shorter).
MAX_LENGTH = 128
#: ``moerge contribute`` settings of every contributor (a few minutes on one core each).
LLM_TRAINING = ("--batch-size", "8", "--lr", "2e-3", "--rank", "8")


@dataclass(frozen=True)
class GenerationScore:
    """What one method's answers scored on the mixed stream."""

    method: str
    routing_accuracy: float  # share of prompts whose top expert is their task's
    exact_match: float  # share of answers equal to the true one (normalised)
    option_named: float  # share of answers whose first named option is the true one
    exact_by_task: dict[str, float]  # exact match per task
    seconds: float  # wall time of the method's Predict calls
    error: str = ""


def coordinator_settings(model_dir: Path) -> dict[str, str]:
    """``MOERGE_*`` settings of a coordinator serving SmolLM2 for causal-LM experts."""
    from moerge.smollm2 import MODEL_ID

    return {
        "MOERGE_BASE_MODEL": str(model_dir),
        "MOERGE_BASE_MODEL_ID": MODEL_ID,
        "MOERGE_TASK_TYPE": "causal_lm",
        "MOERGE_TARGET_MODULES": ",".join(LORA_TARGETS),
        "MOERGE_MAX_INPUT_TOKENS": "256",
    }


def contribute_options(model_dir: Path) -> list[str]:
    """``moerge contribute`` options of every LLM contributor (besides epochs and examples)."""
    return ["--base-model", str(model_dir), *LLM_TRAINING]


def load_chat_task(tokenizer: PreTrainedTokenizerBase, name: str, **caps: int) -> TaskData:
    """Instruction task ``name`` with its prompts rendered by the base model's chat template."""
    from moerge.datasets.instruction_tasks import INSTRUCTION_TASKS, as_chat

    return as_chat(INSTRUCTION_TASKS[name](**caps), tokenizer)


def generation_score(score: MethodScore, tasks: dict[str, TaskData]) -> GenerationScore:
    """Exact match and first-option-named accuracy of one method's generated answers."""
    from moerge.answers import answers_match, first_option_named

    if score.error:
        return GenerationScore(score.method, 0.0, 0.0, 0.0, {}, score.seconds, score.error)
    exact: dict[str, list[bool]] = {task: [] for task in tasks}
    named = 0
    for example, output in score.outputs:
        exact[example.task].append(answers_match(output, example.label))
        options = tasks[example.task].label_names
        named += first_option_named(output, options) == example.label
    count = max(len(score.outputs), 1)
    return GenerationScore(
        method=score.method,
        routing_accuracy=score.routing_accuracy,
        exact_match=sum(sum(v) for v in exact.values()) / count,
        option_named=named / count,
        exact_by_task={task: sum(v) / max(len(v), 1) for task, v in exact.items()},
        seconds=score.seconds,
    )


def run_llm_demo(
    data_dir: Path,
    names: list[str],
    train_per_task: int,
    test_per_task: int,
    epochs: int,
    parallel: int,
    seed: int,
    max_new_tokens: int,
    model_dir: Path | None = None,
) -> list[GenerationScore]:
    """Run the LLM demo into ``data_dir`` (which must not exist) and print its table.

    ``model_dir`` is the causal LM (default: SmolLM2, converted first if needed); it needs a
    chat template and ``q_proj``/``v_proj`` modules.
    """
    from transformers import AutoTokenizer

    from moerge.answers import answers_match
    from moerge.contributor_client.connection import Target
    from moerge.demo import (
        contributor_jobs,
        demo_progress,
        experts_by_task,
        fit_routers,
        run_contributors,
        start_coordinator,
        write_contributor_data,
    )
    from moerge.evaluation import mixed_stream, score_methods
    from moerge.smollm2 import ensure_converted
    from moerge.storage.tokens import new_token

    started = time.perf_counter()
    model_dir = model_dir or ensure_converted()
    coordinator_dir = data_dir / "coordinator"
    coordinator_dir.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tasks = write_contributor_data(
        data_dir, names, train_per_task, test_per_task, seed, partial(load_chat_task, tokenizer)
    )
    tests = {task: [(ex.text, ex.label) for ex in d.test] for task, d in tasks.items()}
    _, admin_token = new_token("mga")
    console.rule("moerge demo --llm (SmolLM2-135M-Instruct)")
    process, address = start_coordinator(
        coordinator_dir,
        admin_token,
        data_dir / "coordinator.log",
        coordinator_settings(model_dir),
    )
    admin = Target(address=address, token=admin_token)
    seconds: dict[str, float] = {}
    try:
        with demo_progress(console) as bar:
            job = bar.add_task(
                f"contributors train and upload causal-LM experts ({parallel} at a time)",
                total=len(names),
            )
            jobs = contributor_jobs(
                admin,
                data_dir,
                names,
                epochs,
                train_per_task,
                gate_steps=0,
                max_length=MAX_LENGTH,
                extra=contribute_options(model_dir),
            )
            begin = time.perf_counter()
            run_contributors(jobs, parallel, lambda _task: bar.advance(job))
            seconds["contributors"] = time.perf_counter() - begin
            expert_of_task = experts_by_task(admin)
            fit = bar.add_task("fit routers from adapters + statistics", total=len(LLM_ROUTERS))
            begin = time.perf_counter()
            fit_routers(admin, LLM_ROUTERS, lambda _method: bar.advance(fit))
            seconds["routers"] = time.perf_counter() - begin
            stream = mixed_stream(tests, seed)
            methods = ("oracle", *LLM_ROUTERS)
            evaluate = bar.add_task(
                "routed generation on the mixed stream", total=len(stream) * len(methods)
            )
            begin = time.perf_counter()
            scored = score_methods(
                admin, methods, stream, expert_of_task, batch_size=16,
                on_batch=lambda n: bar.advance(evaluate, n),
                max_new_tokens=max_new_tokens, match=answers_match,
            )  # fmt: skip
            scores = [generation_score(score, tasks) for score in scored]
            seconds["generation"] = time.perf_counter() - begin
    finally:
        process.terminate()
        process.wait(30)
    seconds["total"] = time.perf_counter() - started
    _print_table(scores, names, len(stream), seconds)
    _save_results(data_dir / "llm_results.json", scores, seconds)
    return scores


def _label(method: str) -> str:
    return {
        "oracle": "oracle (own task's expert)",
        "uniform": "uniform merge",
        "base": "base model (no expert)",
    }.get(method, method)


def _print_table(
    scores: list[GenerationScore], tasks: list[str], n: int, seconds: dict[str, float]
) -> None:
    grid = Table(title=f"routed generation on {n} held-out prompts from {len(tasks)} tasks")
    columns = ["method", "routing acc", "exact match", "option named", *tasks, "predict s"]
    for column in columns:
        grid.add_column(column, justify="left" if column == "method" else "right")
    for s in scores:
        if s.error:
            grid.add_row(_label(s.method), *["-"] * (len(columns) - 2), s.error[:40])
            continue
        grid.add_row(
            _label(s.method),
            "-" if s.method in ("base", "uniform") else f"{s.routing_accuracy:.1%}",
            f"{s.exact_match:.1%}",
            f"{s.option_named:.1%}",
            *(f"{s.exact_by_task.get(t, 0.0):.1%}" for t in tasks),
            f"{s.seconds:.1f}",
        )
    # piped to a file, rich would wrap the table at 80 columns
    (console if console.is_terminal else Console(width=120)).print(grid)
    console.print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))


def _save_results(path: Path, scores: list[GenerationScore], seconds: dict[str, float]) -> None:
    path.write_text(
        json.dumps({"seconds": seconds, "methods": [s.__dict__ for s in scores]}, indent=2) + "\n"
    )
