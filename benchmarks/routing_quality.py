"""Routing quality at full budget: every routing method on a mixed stream of real tasks.

The pipeline is the one of ``moerge demo`` (:mod:`moerge.demo`, :mod:`moerge.evaluation`): a
coordinator process, one contributor process per task that sees only its own data and uploads a
LoRA expert, routers fitted from adapters and statistics alone, and a shuffled stream of held-out
examples sent to ``Predict``. On top of the demo it measures:

* a **raw-data ceiling**: a multinomial logistic regression over tasks, fitted on the pooled
  base-model embeddings of every task's training texts (the embedding the routers use); it sees
  exactly what the platform never sees, so the gap to it is the price of not seeing data;
* **late joiners**: the first ``--early`` contributors upload, the coordinator's own retraining
  scheduler (``RetrainPolicy``, short debounce) fits a router, the stream is scored; then the rest
  upload and the same scheduler picks them up. Reported: accuracy before and after, and the time
  from each late expert's commit to its appearance in the active router's expert list.

Writes ``benchmarks/results/routing_quality.md``. Run with ``OMP_NUM_THREADS=1`` on a shared box.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moerge.cli.rpc import call
from moerge.contributor_client.connection import Target
from moerge.datasets import TaskData, available_tasks
from moerge.demo import (
    DEFAULT_TASKS,
    contributor_jobs,
    experts_by_task,
    fit_routers,
    run_contributors,
    start_coordinator,
    write_contributor_data,
)
from moerge.evaluation import (
    MethodScore,
    StreamExample,
    majority_floor,
    mixed_stream,
    save_confusion_png,
    score_assigned,
    score_method,
    score_methods,
)
from moerge.v1 import admin_pb2

#: Routers fitted without raw data (``federated`` with 0 rounds is its LDA initialisation).
ROUTERS = ("centroid", "lda", "qda", "mlp", "federated", "arrow", "phatgoose")
BASELINES = ("uniform", "base")
CEILING = "ceiling (raw data)"
RESULTS = Path(__file__).parent / "results" / "routing_quality.md"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the raw-data ceiling -------------------------------------------------------------------------
@dataclass
class LogisticCeiling:
    """Multinomial logistic regression over tasks: ``logits = x @ weight.T + bias``."""

    weight: torch.Tensor  # [C, H]
    bias: torch.Tensor  # [C]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Task index per row of ``x`` [N, H] -> [N]."""
        return (x @ self.weight.T + self.bias).argmax(dim=-1)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-4, max_iter: int = 500
) -> LogisticCeiling:
    """Fit on embeddings ``x`` [N, H] and class indices ``y`` [N] by full-batch L-BFGS.

    Classes are weighted inversely to their size, so a task with more training texts does not
    buy the ceiling routing accuracy that the class-balanced routers cannot have.
    """
    x = x.float().clone()  # a normal tensor, even from inference mode
    counts = torch.bincount(y, minlength=num_classes).clamp(min=1).float()
    class_weight = counts.sum() / (num_classes * counts)  # [C]
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)  # [C, H]
    bias = torch.zeros(num_classes, requires_grad=True)  # [C]
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight.T + bias  # [N, C]
        loss = torch.nn.functional.cross_entropy(logits, y, weight=class_weight)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LogisticCeiling(weight.detach(), bias.detach())


def embed(texts: list[str]) -> torch.Tensor:
    """Routing embeddings [N, H] of ``texts``: the coordinator's base model and pooling."""
    from transformers import AutoModel, AutoTokenizer

    from moerge.base_model import default_base_model
    from moerge.embedding import EMBEDDING_MAX_LENGTH, pooled_embeddings

    path = default_base_model()
    model = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return pooled_embeddings(model, tokenizer, texts, max_length=EMBEDDING_MAX_LENGTH)


class CeilingEmbeddings(threading.Thread):
    """Embed the training texts and the stream in the background while contributors train."""

    def __init__(self, data: dict[str, TaskData], stream: list[StreamExample], names: list[str]):
        super().__init__(daemon=True)
        self.train = [(ex.text, i) for i, task in enumerate(names) for ex in data[task].train]
        self.stream = [ex.text for ex in stream]
        self.x: torch.Tensor | None = None  # [N_train + N_stream, H]
        self.seconds = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self.x = embed([text for text, _ in self.train] + self.stream)
        except BaseException as exc:  # re-raised by routes()
            self.error = exc
        self.seconds = time.perf_counter() - started

    def routes(self, names: list[str]) -> tuple[list[str], float]:
        """The ceiling's task for each stream example, and its fit time (embedding excluded)."""
        self.join()
        if self.error is not None or self.x is None:
            raise RuntimeError("embedding for the ceiling failed") from self.error
        n = len(self.train)
        y_train = torch.tensor([label for _, label in self.train])  # [N_train]
        started = time.perf_counter()
        ceiling = fit_logistic(self.x[:n], y_train, len(names))
        fit_seconds = time.perf_counter() - started
        return [names[i] for i in ceiling.predict(self.x[n:]).tolist()], fit_seconds


# -- tables ---------------------------------------------------------------------------------------
def score_table(
    scores: list[MethodScore],
    fit_seconds: dict[str, float],
    oracle: str,
    ceiling: str,
    floor: float | None = None,
) -> list[str]:
    """Markdown rows: routing and task accuracy, as shares of the ceiling and of the oracle,
    and the majority-class ``floor`` (each text answered with its task's most common label):
    when the experts sit near it, a share of the oracle says nothing about routing."""
    by_name = {s.method: s for s in scores}
    oracle_task = by_name[oracle].task_accuracy or 1.0
    ceiling_routing = by_name[ceiling].routing_accuracy or 1.0
    lines = [
        "| method | routing acc | % of ceiling routing | task acc | % of oracle task "
        "| fit s | predict s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        if s.error:
            lines.append(f"| {s.method} | - | - | - | - | - | {s.error} |")
            continue
        lines.append(
            f"| {s.method} | {s.routing_accuracy:.1%} | "
            f"{s.routing_accuracy / ceiling_routing:.1%} | {s.task_accuracy:.1%} | "
            f"{s.task_accuracy / oracle_task:.1%} | {fit_seconds.get(s.method, 0.0):.2f} | "
            f"{s.seconds:.1f} |"
        )
    if floor is not None:
        lines.append(
            f"| majority floor | - | - | {floor:.1%} | {floor / oracle_task:.1%} | - | - |"
        )
    return lines


def per_task_routing(scores: list[MethodScore], names: list[str]) -> list[str]:
    """Markdown rows: each method's routing accuracy on each source task."""
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for s in scores:
        if s.error:
            continue
        cells = []
        for task in names:
            total = sum(n for (source, _), n in s.confusion.items() if source == task)
            right = s.confusion[(task, task)]
            cells.append(f"{right / total:.1%}" if total else "-")
        lines.append(f"| {s.method} | " + " | ".join(cells) + " |")
    return lines


def goals(scores: list[MethodScore], oracle: str, ceiling: str) -> list[str]:
    """The benchmark's three goals, each with the measured number and whether it is met."""
    by_name = {s.method: s for s in scores}
    routers = [by_name[m] for m in ROUTERS if m in by_name and not by_name[m].error]
    if not routers:
        return ["- no router produced a score"]
    best_task = max(routers, key=lambda s: s.task_accuracy)
    best_routing = max(routers, key=lambda s: s.routing_accuracy)
    task_share = best_task.task_accuracy / (by_name[oracle].task_accuracy or 1.0)
    routing_share = best_routing.routing_accuracy / (by_name[ceiling].routing_accuracy or 1.0)
    uniform = by_name.get("uniform")
    losers = [s.method for s in routers if uniform and s.task_accuracy <= uniform.task_accuracy]

    def met(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    return [
        f"- best no-raw-data task accuracy >= 95% of the oracle's: {best_task.method} "
        f"{task_share:.1%} - {met(task_share >= 0.95)}",
        f"- best no-raw-data routing accuracy >= 98% of the ceiling's: {best_routing.method} "
        f"{routing_share:.1%} - {met(routing_share >= 0.98)}",
        "- every router beats the uniform merge on task accuracy: "
        + (met(not losers) if uniform and not uniform.error else "no uniform score")
        + (f" (not: {', '.join(losers)})" if losers else ""),
    ]


# -- late joiners ---------------------------------------------------------------------------------
def active_router(admin: Target) -> admin_pb2.RouterVersion | None:
    """The active router version, if any."""
    page = call(admin, "admin", "ListRouterVersions", admin_pb2.ListRouterVersionsRequest())
    return next((version for version in page.versions if version.active), None)


def active_router_experts(admin: Target) -> tuple[int, set[str]]:
    """The active router version and its expert ids (0 and an empty set if none)."""
    version = active_router(admin)
    return (version.version, set(version.expert_ids)) if version else (0, set())


def wait_routable(admin: Target, expert_ids: set[str], timeout: float) -> float:
    """Poll until the active router holds every one of ``expert_ids``; the wall time then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expert_ids <= active_router_experts(admin)[1]:
            return time.time()
        time.sleep(0.25)
    raise TimeoutError(f"experts {sorted(expert_ids)} were not routable after {timeout:.0f} s")


def join_late(
    admin: Target, jobs: list, parallel: int, poll_seconds: float = 0.25, timeout: float = 900.0
) -> dict[str, dict[str, float]]:
    """Run the late contributors while polling; per task: commit time and routable time."""
    failure: list[BaseException] = []

    def contribute() -> None:
        try:
            run_contributors(jobs, parallel, lambda task: log(f"late contributor {task} done"))
        except BaseException as exc:  # reported by the caller
            failure.append(exc)

    worker = threading.Thread(target=contribute)
    worker.start()
    late = {task for task, _ in jobs}
    seen: dict[str, dict[str, float]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not failure:
        experts = call(admin, "admin", "ListExperts", admin_pb2.ListExpertsRequest(page_size=1000))
        version, routable = active_router_experts(admin)
        now = time.time()
        for expert in experts.experts:
            if expert.task_name in late and expert.task_name not in seen:
                seen[expert.task_name] = {"commit": expert.created_at.ToDatetime().timestamp()}
            entry = seen.get(expert.task_name)
            if entry is not None and "routable" not in entry and expert.expert_id in routable:
                entry["routable"] = now
                entry["version"] = version
                log(f"{expert.task_name} routable in router v{version}")
        if len(seen) == len(late) and all("routable" in e for e in seen.values()):
            break
        time.sleep(poll_seconds)
    worker.join()
    if failure:
        raise failure[0]
    return seen


# -- the run --------------------------------------------------------------------------------------
def machine() -> str:
    import peft
    import transformers

    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}; moerge {rev or '?'}"
        f"{' + uncommitted changes' if dirty else ''}; {platform.machine()}, "
        f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    # defaults: what fitted ~35-50 min on the 2 shared cores; 1000 / 300 on a quiet machine
    parser.add_argument("--train-per-task", type=int, default=600)
    parser.add_argument("--test-per-task", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--gate-steps", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2, help="contributors training at once")
    parser.add_argument("--early", type=int, default=3, help="experts before the late joiners")
    parser.add_argument("--debounce", type=float, default=5.0, help="retrain debounce, seconds")
    parser.add_argument("--retrain-method", default="centroid", help="method the scheduler fits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from moerge.storage.tokens import new_token

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    missing = [t for t in names if t not in available_tasks()]
    if missing:
        sys.exit(f"no data for {missing}: run scripts/fetch_data.sh")
    if not 1 <= args.early < len(names):
        sys.exit("--early must leave at least one late task")
    data_dir = (args.data_dir or Path(tempfile.mkdtemp(prefix="moerge-rq-"))).resolve()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    (data_dir / "coordinator").mkdir(parents=True)
    loads = {"start": load()}
    started = time.perf_counter()
    data = write_contributor_data(
        data_dir, names, args.train_per_task, args.test_per_task, args.seed
    )
    tests = {task: [(ex.text, ex.label) for ex in d.test] for task, d in data.items()}
    stream = mixed_stream(tests, args.seed)
    sizes = {task: (len(d.train), len(d.test)) for task, d in data.items()}
    log(f"data: {sizes}; stream of {len(stream)}; dir {data_dir}")
    ceiling = CeilingEmbeddings(data, stream, names)
    ceiling.start()

    _, admin_token = new_token("mga")
    settings = {
        "MOERGE_AUTO_RETRAIN": "true",
        "MOERGE_RETRAIN_DEBOUNCE_SECONDS": str(args.debounce),
        "MOERGE_ROUTER_METHOD": args.retrain_method,
    }
    process, address = start_coordinator(
        data_dir / "coordinator", admin_token, data_dir / "coordinator.log", settings
    )
    admin = Target(address=address, token=admin_token)
    try:
        jobs = contributor_jobs(
            admin, data_dir, names, args.epochs, args.train_per_task, args.gate_steps
        )
        early, late = jobs[: args.early], jobs[args.early :]
        t0 = time.perf_counter()
        run_contributors(early, args.parallel, lambda task: log(f"contributor {task} done"))
        train_early = time.perf_counter() - t0
        early_experts = experts_by_task(admin)
        wait_routable(admin, set(early_experts.values()), timeout=600)
        before = score_method(admin, args.retrain_method, stream, early_experts)
        log(f"before late joiners: routing {before.routing_accuracy:.1%}")
        loads["early experts"] = load()

        t0 = time.perf_counter()
        joined = join_late(admin, late, args.parallel)
        train_late = time.perf_counter() - t0
        expert_of_task = experts_by_task(admin)
        after = score_method(admin, args.retrain_method, stream, expert_of_task)
        log(f"after late joiners: routing {after.routing_accuracy:.1%}")
        loads["late experts"] = load()

        # the scheduler's router over every expert is this method's row; fit the others
        others = [m for m in (*ROUTERS, *BASELINES) if m != args.retrain_method]
        fit_seconds = fit_routers(admin, others)
        fit_seconds[args.retrain_method] = active_router(admin).fit_seconds
        log(f"routers fitted: {fit_seconds}")
        scored = {s.method: s for s in score_methods(
            admin, ["oracle", *others], stream, expert_of_task
        )}  # fmt: skip
        scored[args.retrain_method] = after
        scores = [scored[m] for m in ("oracle", *ROUTERS, *BASELINES)]
        for s in scores[1:]:
            log(f"{s.method}: {s.routing_accuracy:.1%} / {s.task_accuracy:.1%}")
        routed, fit_seconds[CEILING] = ceiling.routes(names)
        log(f"ceiling embeddings took {ceiling.seconds:.0f} s")
        scores.insert(1, score_assigned(admin, CEILING, stream, routed, expert_of_task))
        log(f"ceiling: {scores[1].routing_accuracy:.1%} / {scores[1].task_accuracy:.1%}")
        loads["end"] = load()
        best = max(
            (s for s in scores if s.method in ROUTERS and not s.error),
            key=lambda s: s.routing_accuracy,
        )
        png = save_confusion_png(best, names, data_dir / "routing_confusion.png")
    finally:
        process.terminate()
        process.wait(30)
    total = time.perf_counter() - started
    report = render(
        args,
        argv,
        names,
        sizes,
        scores,
        fit_seconds,
        before,
        after,
        joined,
        early=[t for t, _ in early],
        loads=loads,
        timings={"early": train_early, "late": train_late, "total": total},
        floor=majority_floor(stream).accuracy,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    log(f"wrote {args.out}; confusion matrix of {best.method}: {png}; total {total:.0f} s")


def render(
    args: argparse.Namespace,
    argv: list[str] | None,
    names: list[str],
    sizes: dict[str, tuple[int, int]],
    scores: list[MethodScore],
    fit_seconds: dict[str, float],
    before: MethodScore,
    after: MethodScore,
    joined: dict[str, dict[str, float]],
    early: list[str],
    loads: dict[str, str],
    timings: dict[str, float],
    floor: float | None = None,
) -> str:
    """The results file: command, versions, machine, load, budget, tables and goals."""
    command = " ".join(["python benchmarks/routing_quality.py", *(argv or sys.argv[1:])])
    n = sum(test for _, test in sizes.values())
    late_rows = []
    for task, entry in sorted(joined.items()):
        delay = entry.get("routable", float("nan")) - entry["commit"]
        late_rows.append(f"| {task} | v{int(entry.get('version', 0))} | {delay:.1f} |")

    def early_share(score: MethodScore) -> str:
        total = sum(n for (source, _), n in score.confusion.items() if source in early)
        right = sum(score.confusion[(t, t)] for t in early)
        return f"{right / total:.1%}" if total else "-"

    return "\n".join(
        [
            "# Routing quality on real tasks",
            "",
            f"- command: `OMP_NUM_THREADS=1 {command}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}",
            "- machine: the shared 2-core development box, with other jobs running; load average "
            "(1/5/15 min) " + "; ".join(f"{k}: {v}" for k, v in loads.items()),
            f"- budget: --train-per-task {args.train_per_task} --epochs {args.epochs} "
            f"--test-per-task {args.test_per_task} --gate-steps {args.gate_steps}, "
            f"{args.parallel} contributors at a time, one thread each; MiniLM base, "
            "max length 64 for training",
            "- train/test examples per task: "
            + ", ".join(f"{t} {a}/{b}" for t, (a, b) in sizes.items()),
            f"- wall time: {timings['total'] / 60:.1f} min (experts: first {len(early)} "
            f"{timings['early']:.0f} s, late ones {timings['late']:.0f} s)",
            "",
            f"## Every method on the mixed stream ({n} held-out examples, {len(names)} tasks)",
            "",
            "Routing accuracy: the highest-weight expert is the example's own task's. Task "
            "accuracy: the predicted label is right. The oracle sends each example to its own "
            f"task's expert; the *{CEILING}* is a logistic regression over tasks fitted on the "
            "pooled base-model embeddings of every task's training texts (it sees raw data; "
            "its examples then go to the expert it picks). `federated` is its LDA "
            "initialisation (0 rounds). `base` is the frozen base model, which has no "
            f"classification head. The `{args.retrain_method}` row is the router that the "
            "retraining scheduler fitted over all experts in the late-join run below.",
            "",
            *score_table(scores, fit_seconds, "oracle", CEILING, floor),
            "",
            "### Goals",
            "",
            *goals(scores, "oracle", CEILING),
            "",
            "### Routing accuracy per source task",
            "",
            *per_task_routing(scores, names),
            "",
            "## New contributors joining late",
            "",
            f"Experts of {', '.join(early)} upload first; the coordinator's retraining scheduler "
            f"(`RetrainPolicy`, `retrain_debounce_seconds={args.debounce:g}`, method "
            f"`{args.retrain_method}`) fits a router; the whole stream is scored with it. Then "
            "the other contributors upload and the same scheduler refits.",
            "",
            "| router | experts | routing acc (all tasks) | routing acc (first tasks) | task acc |",
            "|---|---:|---:|---:|---:|",
            f"| before | {len(early)} | {before.routing_accuracy:.1%} | {early_share(before)} | "
            f"{before.task_accuracy:.1%} |",
            f"| after | {len(names)} | {after.routing_accuracy:.1%} | {early_share(after)} | "
            f"{after.task_accuracy:.1%} |",
            "",
            "Time from a late expert's commit (its registry `created_at`) to its appearance in "
            "the active router version's expert list (polled every 0.25 s):",
            "",
            "| late task | router version | seconds |",
            "|---|---|---:|",
            *late_rows,
            "",
        ]
    )


if __name__ == "__main__":
    main()
