"""``moerge demo``: the whole platform, end to end, on real offline data, in a few minutes.

1. starts a coordinator on the embedded defaults (SQLite, local blob store, 127.0.0.1) as its
   own process;
2. enrols one contributor per task; each is a separate process that sees only its own folder
   (``<dir>/contributors/<task>/data.jsonl``) and runs ``moerge join`` + ``moerge contribute``
   (train a LoRA expert, compute statistics, upload);
3. trains every router from the uploaded adapters and statistics alone;
4. sends a shuffled mixed stream of held-out examples to ``Predict`` with each method and prints
   routing and task accuracy per method, saving the best router's routing confusion matrix as
   a PNG.

The data dir is left in place: ``moerge coordinator serve --data-dir <dir>/coordinator`` reopens
it (the admin token is in ``<dir>/coordinator/admin-token``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from moerge.contributor_client.connection import Target
    from moerge.datasets import TaskData

console = Console()

DEFAULT_TASKS = ("bbc_news", "rotten_tomatoes", "amazon_food", "fortunes", "wordnet_supersense")
#: ``--llm``: the instruction tasks of moerge.datasets.instruction_tasks
LLM_TASKS = ("word_class", "news_topic", "review_verdict")
ROUTERS = ("centroid", "lda", "qda", "mlp", "arrow", "phatgoose", "uniform")


def _moerge(*args: str) -> list[str]:
    return [sys.executable, "-m", "moerge.cli", *args]


def start_coordinator(
    data_dir: Path, admin_token: str, log: Path, settings: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Run ``moerge coordinator serve`` on a free loopback port; return (process, address).

    ``settings`` are extra ``MOERGE_*`` environment variables (automatic retraining is off
    unless they turn it on).
    """
    env = {
        **os.environ,
        "MOERGE_ADMIN_TOKEN": admin_token,
        "MOERGE_AUTO_RETRAIN": "false",
        **(settings or {}),
    }
    handle = open(log, "w")  # noqa: SIM115 - owned by the child process' lifetime
    process = subprocess.Popen(
        _moerge("coordinator", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"),
        stdout=subprocess.PIPE,
        stderr=handle,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        if "serving on port" in line:
            return process, f"127.0.0.1:{int(line.rsplit(' ', 1)[1])}"
    process.kill()
    raise RuntimeError(f"the coordinator did not start; see {log}")


def contributor_process(
    folder: Path,
    address: str,
    enrollment: str,
    task: str,
    epochs: int,
    max_examples: int,
    gate_steps: int,
    max_length: int = 64,
    extra: Sequence[str] = (),
) -> subprocess.Popen:
    """Join and contribute as a separate process whose home is ``folder`` (its data only).

    One torch thread per contributor, so two contributors share the 2 cores side by side.
    ``gate_steps=0`` trains no PHATGOOSE gates; ``extra`` are more ``moerge contribute``
    options (e.g. ``--base-model``).
    """
    env = {**os.environ, "MOERGE_HOME": str(folder / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("MOERGE_TOKEN", None)
    join = shlex.join(
        _moerge("join", "--coordinator", address, "--token", enrollment, "--name", f"lab-{task}")
    )
    contribute = shlex.join(
        _moerge(
            "contribute",
            str(folder / "data.jsonl"),
            "--task-name",
            task,
            "--epochs",
            str(epochs),
            "--max-examples",
            str(max_examples),
            "--max-length",
            str(max_length),
            *(["--gate-steps", str(gate_steps)] if gate_steps else ["--no-gates"]),
            *extra,
            "--json",
        )
    )
    log = open(folder / "contributor.log", "w")  # noqa: SIM115 - closed when the process ends
    return subprocess.Popen(
        ["/bin/sh", "-c", f"{join} && {contribute}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=folder,
    )


def run_contributors(
    jobs: list[tuple[str, Callable[[], subprocess.Popen]]],
    parallel: int,
    on_done: Callable[[str], None],
) -> None:
    """Run contributor processes ``parallel`` at a time; raise if any fails."""
    waiting = list(jobs)
    running: list[tuple[str, subprocess.Popen]] = []
    while waiting or running:
        while waiting and len(running) < parallel:
            task, start = waiting.pop(0)
            running.append((task, start()))
        time.sleep(0.5)
        for task, process in list(running):
            if process.poll() is None:
                continue
            running.remove((task, process))
            if process.returncode != 0:
                for _, other in running:
                    other.kill()
                raise RuntimeError(f"contributor {task} failed; see its contributor.log")
            on_done(task)


def write_contributor_data(
    data_dir: Path,
    names: list[str],
    train_per_task: int,
    test_per_task: int,
    seed: int,
    load: Callable[..., TaskData] | None = None,
) -> dict[str, TaskData]:
    """Give each task's contributor a folder holding only its training data; return the tasks.

    ``load(name, max_train=, max_test=, seed=)`` reads a task (default: ``datasets.load_task``).
    """
    from moerge.datasets import load_task, write_jsonl

    tasks = {}
    for task in names:
        data = (load or load_task)(
            task, max_train=train_per_task, max_test=test_per_task, seed=seed
        )
        folder = data_dir / "contributors" / task
        folder.mkdir(parents=True)
        write_jsonl(data.train, folder / "data.jsonl")
        tasks[task] = data
    return tasks


def contributor_jobs(
    admin: Target,
    data_dir: Path,
    names: list[str],
    epochs: int,
    max_examples: int,
    gate_steps: int,
    max_length: int = 64,
    extra: Sequence[str] = (),
) -> list[tuple[str, Callable[[], subprocess.Popen]]]:
    """One enrollment token and one deferred contributor process per task."""
    from moerge.cli.rpc import call
    from moerge.v1 import admin_pb2

    jobs: list[tuple[str, Callable[[], subprocess.Popen]]] = []
    for task in names:
        token = call(
            admin,
            "admin",
            "CreateEnrollmentToken",
            admin_pb2.CreateEnrollmentTokenRequest(note=f"demo {task}"),
        ).token
        folder = data_dir / "contributors" / task
        start = partial(
            contributor_process,
            folder,
            admin.address,
            token,
            task,
            epochs,
            max_examples,
            gate_steps,
            max_length,
            extra,
        )
        jobs.append((task, start))
    return jobs


def experts_by_task(admin: Target) -> dict[str, str]:
    """Task name -> expert id of every registered expert."""
    from moerge.cli.rpc import call
    from moerge.v1 import admin_pb2

    experts = call(admin, "admin", "ListExperts", admin_pb2.ListExpertsRequest(page_size=1000))
    return {e.task_name: e.expert_id for e in experts.experts}


def fit_routers(
    admin: Target, methods: Sequence[str], on_fit: Callable[[str], None] | None = None
) -> dict[str, float]:
    """Train one router version per method (only ``centroid`` is activated); fit seconds each."""
    from moerge.cli.rpc import call
    from moerge.v1 import admin_pb2

    fit_seconds = {}
    for method in methods:
        version = call(
            admin,
            "admin",
            "TrainRouter",
            admin_pb2.TrainRouterRequest(method=method, no_activate=method != "centroid"),
        )
        fit_seconds[method] = version.fit_seconds
        if on_fit:
            on_fit(method)
    return fit_seconds


def demo_progress(console: Console) -> Progress:
    """The demo's progress bars: one per phase, with counts and elapsed time."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def demo(
    data_dir: Annotated[Path, typer.Option(help="where everything is written")] = Path("demo-data"),
    tasks: Annotated[
        str | None,
        typer.Option(help=f"comma-separated task names (default {','.join(DEFAULT_TASKS)})"),
    ] = None,
    train_per_task: Annotated[
        int | None, typer.Option(help="training examples per contributor (200; 48 with --llm)")
    ] = None,
    test_per_task: Annotated[
        int | None, typer.Option(help="held-out examples per task (40; 20 with --llm)")
    ] = None,
    epochs: Annotated[int, typer.Option(help="training epochs per expert")] = 2,
    gate_steps: Annotated[int, typer.Option(help="PHATGOOSE gate steps per expert")] = 30,
    parallel: Annotated[int, typer.Option(help="contributors training at once")] = 2,
    seed: int = 0,
    llm: Annotated[
        bool,
        typer.Option(
            "--llm",
            help="causal-LM experts on SmolLM2-135M-Instruct, scored on routed generation "
            f"(default tasks {','.join(LLM_TASKS)}; no gates)",
        ),
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="--llm: tokens generated per answer")] = 8,
) -> None:
    """Run the end-to-end demo and print the routing table."""
    from moerge.contributor_client.connection import Target
    from moerge.datasets import available_tasks
    from moerge.evaluation import (
        majority_floor,
        mixed_stream,
        save_confusion_png,
        score_methods,
    )
    from moerge.storage.tokens import new_token

    data_dir = data_dir.resolve()  # contributors run in their own folders
    default_tasks = LLM_TASKS if llm else DEFAULT_TASKS
    names = [t.strip() for t in (tasks or ",".join(default_tasks)).split(",") if t.strip()]
    train_per_task = train_per_task or (48 if llm else 200)
    test_per_task = test_per_task or (20 if llm else 40)
    if llm:
        from moerge.datasets.instruction_tasks import INSTRUCTION_TASKS
        from moerge.llm_demo import run_llm_demo

        unknown = [t for t in names if t not in INSTRUCTION_TASKS]
        if unknown or len(names) < 2:
            raise typer.BadParameter(
                f"--llm needs at least two of {sorted(INSTRUCTION_TASKS)}; got {names}"
            )
        if data_dir.exists():
            shutil.rmtree(data_dir)
        run_llm_demo(
            data_dir, names, train_per_task, test_per_task, epochs, parallel, seed, max_new_tokens
        )
        return
    missing = [t for t in names if t not in available_tasks()]
    if missing:
        console.print(
            f"[yellow]skipping tasks without data: {missing} (run scripts/fetch_data.sh)[/yellow]"
        )
        names = [t for t in names if t not in missing]
    if len(names) < 2:
        raise typer.BadParameter("the demo needs at least two tasks with data")
    if data_dir.exists():
        shutil.rmtree(data_dir)
    coordinator_dir = data_dir / "coordinator"
    coordinator_dir.mkdir(parents=True)
    data = write_contributor_data(data_dir, names, train_per_task, test_per_task, seed)
    tests = {task: [(ex.text, ex.label) for ex in d.test] for task, d in data.items()}
    _, admin_token = new_token("mga")
    console.rule("moerge demo")
    process, address = start_coordinator(coordinator_dir, admin_token, data_dir / "coordinator.log")
    admin = Target(address=address, token=admin_token)
    started = time.perf_counter()
    try:
        with demo_progress(console) as bar:
            job = bar.add_task(
                "contributors train and upload experts (2 at a time)", total=len(names)
            )
            jobs = contributor_jobs(admin, data_dir, names, epochs, train_per_task, gate_steps)
            run_contributors(jobs, parallel, lambda _task: bar.advance(job))
            expert_of_task = experts_by_task(admin)
            fit = bar.add_task("fit routers from adapters + statistics", total=len(ROUTERS))
            fit_seconds = fit_routers(admin, ROUTERS, lambda _method: bar.advance(fit))
            stream = mixed_stream(tests, seed)
            methods = ("oracle", *ROUTERS)
            evaluate = bar.add_task(
                "routed predictions on the mixed stream", total=len(stream) * len(methods)
            )
            scores = score_methods(
                admin, methods, stream, expert_of_task,
                on_batch=lambda n: bar.advance(evaluate, n),
            )  # fmt: skip
        _print_table(scores, fit_seconds, len(stream), names, majority_floor(stream).accuracy)
        best = max(
            (s for s in scores if s.method not in ("oracle", "uniform") and not s.error),
            key=lambda s: s.routing_accuracy,
        )
        png = save_confusion_png(best, names, data_dir / "routing_confusion.png")
        console.print(f"routing confusion matrix of {best.method}: {png}")
        console.print(
            f"total {time.perf_counter() - started:.0f} s; reopen with "
            f"`moerge coordinator serve --data-dir {coordinator_dir}` "
            f"(admin token in {coordinator_dir / 'admin-token'})"
        )
        (coordinator_dir / "admin-token").write_text(admin_token + "\n")
        os.chmod(coordinator_dir / "admin-token", 0o600)
    finally:
        process.terminate()
        process.wait(30)


def _print_table(
    scores: list, fit_seconds: dict[str, float], n: int, tasks: list[str], floor: float
) -> None:
    """One row per method, and the majority-class floor (each text answered with its task's most
    common label): "% of oracle" means little when the oracle itself sits near the floor."""
    oracle = next(s for s in scores if s.method == "oracle").task_accuracy or 1.0
    grid = Table(title=f"mixed stream of {n} held-out examples from {len(tasks)} tasks")
    for column in ("method", "routing acc", "task acc", "% of oracle", "fit s", "predict s"):
        grid.add_column(column, justify="left" if column == "method" else "right")
    for s in scores:
        if s.error:
            grid.add_row(s.method, "-", "-", "-", "-", s.error[:40])
            continue
        grid.add_row(
            s.method,
            f"{s.routing_accuracy:.1%}",
            f"{s.task_accuracy:.1%}",
            f"{s.task_accuracy / oracle:.1%}",
            f"{fit_seconds.get(s.method, 0):.2f}",
            f"{s.seconds:.1f}",
        )
    grid.add_row("majority floor", "-", f"{floor:.1%}", f"{floor / oracle:.1%}", "-", "-")
    console.print(grid)
