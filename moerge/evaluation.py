"""Score routing methods on a mixed stream of labelled examples, through the public Predict API.

The one scorer of ``moerge evaluate``, ``moerge demo`` (and ``--llm``) and
``benchmarks/routing_quality.py``. Each example knows its source task (hence the expert that
should serve it) and its true label; nothing here looks inside the coordinator. *Routing
accuracy* is the share of examples whose highest-weight expert is their source task's expert;
*task accuracy* the share whose output matches the true label (equal labels for classifiers,
normalised exact match of the generated text for causal LMs). The *majority floor* is what
always answering each task's most common label would score, counted on the evaluated examples'
own labels (the coordinator does not share the training data's).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from moerge.contributor_client.connection import Target
from moerge.v1 import inference_pb2, inference_pb2_grpc

#: method name -> (routing_method sent to Predict, aggregation, top_k)
METHODS: dict[str, tuple[str, int, int]] = {
    "oracle": ("", inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE, 1),
    "centroid": ("centroid", inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE, 1),
    "lda": ("lda", inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE, 1),
    "qda": ("qda", inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE, 1),
    "mlp": ("mlp", inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE, 1),
    "federated": ("federated", inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE, 1),
    "arrow": ("arrow", inference_pb2.AGGREGATION_MODULE_MIX, 0),
    "phatgoose": ("phatgoose", inference_pb2.AGGREGATION_MODULE_MIX, 0),
    "uniform": ("uniform", inference_pb2.AGGREGATION_MERGE_LINEAR, 0),
    "base": ("base", inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE, 0),
}


#: ``match(output, label)``: whether an output counts as right (None: equality).
Match = Callable[[str, str], bool] | None


@dataclass(frozen=True)
class StreamExample:
    """One held-out example of the mixed stream, with the task it came from (the routing target)."""

    text: str
    label: str
    task: str


@dataclass
class MethodScore:
    """One routing method's tally over the stream: routed to the source expert, labelled right, time
    and the confusion of source and routed expert."""

    method: str
    examples: int = 0
    routed_right: int = 0
    labelled_right: int = 0
    seconds: float = 0.0
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)  # (source, routed)
    error: str = ""
    outputs: list[tuple[StreamExample, str]] = field(default_factory=list)  # for other metrics

    @property
    def routing_accuracy(self) -> float:
        """Share of examples routed to their source expert (0 for none)."""
        return self.routed_right / self.examples if self.examples else 0.0

    @property
    def task_accuracy(self) -> float:
        """Share of examples whose label came out right (0 for none)."""
        return self.labelled_right / self.examples if self.examples else 0.0


def mixed_stream(
    tests: Mapping[str, Sequence[tuple[str, str]]], seed: int = 0
) -> list[StreamExample]:
    """Every task's held-out (text, label) pairs, shuffled together."""
    stream = [StreamExample(t, y, task) for task, pairs in tests.items() for t, y in pairs]
    random.Random(seed).shuffle(stream)
    return stream


def score_method(
    target: Target,
    method: str,
    stream: Sequence[StreamExample],
    expert_of_task: dict[str, str],
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
    max_new_tokens: int = 0,
    match: Match = None,
) -> MethodScore:
    """Send the stream to Predict with one method; tally routing and task accuracy.

    ``max_new_tokens`` bounds generation for causal LMs (0: the coordinator's default);
    ``match(output, label)`` decides a right answer (default: equality). A method outside
    :data:`METHODS` (a router added later) is sent as is, top-1 output ensemble.
    """
    if method == "oracle":
        return score_assigned(
            target,
            method,
            stream,
            [ex.task for ex in stream],
            expert_of_task,
            batch_size,
            on_batch,
            max_new_tokens,
            match,
        )
    default = (method, inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE, 1)
    routing_method, aggregation, top_k = METHODS.get(method, default)
    task_of_expert = {e: t for t, e in expert_of_task.items()}
    score = MethodScore(method)
    started = time.perf_counter()
    with target.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for start in range(0, len(stream), batch_size):
            batch = stream[start : start + batch_size]
            response = _predict(
                stub, target, score, inputs=[ex.text for ex in batch],
                routing_method=routing_method, aggregation=aggregation, top_k=top_k,
                max_new_tokens=max_new_tokens,
            )  # fmt: skip
            if response is None:
                return score
            for ex, prediction in zip(batch, response.predictions, strict=True):
                top = max(prediction.experts, key=lambda e: e.weight, default=None)
                routed = task_of_expert.get(top.expert_id, "?") if top else "-"  # "-": no expert
                _tally(score, ex, routed, prediction.output, match)
            if on_batch:
                on_batch(len(batch))
    score.seconds = time.perf_counter() - started
    return score


def score_assigned(
    target: Target,
    method: str,
    stream: Sequence[StreamExample],
    routed_tasks: Sequence[str],
    expert_of_task: dict[str, str],
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
    max_new_tokens: int = 0,
    match: Match = None,
) -> MethodScore:
    """Score routing decided by the caller: example i goes to ``routed_tasks[i]``'s expert.

    The oracle passes each example's own task; a router fitted by the caller (e.g. the raw-data
    ceiling of the benchmark) passes its predictions. Examples are batched per expert.
    """
    score = MethodScore(method)
    started = time.perf_counter()
    by_task: dict[str, list[int]] = {}
    for i, task in enumerate(routed_tasks):
        by_task.setdefault(task, []).append(i)
    with target.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for task, rows in by_task.items():
            for start in range(0, len(rows), batch_size):
                batch = [stream[i] for i in rows[start : start + batch_size]]
                response = _predict(
                    stub, target, score, inputs=[ex.text for ex in batch],
                    expert_ids=[expert_of_task[task]], top_k=1,
                    aggregation=inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE,
                    max_new_tokens=max_new_tokens,
                )  # fmt: skip
                if response is None:
                    return score
                for ex, prediction in zip(batch, response.predictions, strict=True):
                    _tally(score, ex, task, prediction.output, match)
                if on_batch:
                    on_batch(len(batch))
    score.seconds = time.perf_counter() - started
    return score


def _predict(
    stub: inference_pb2_grpc.InferenceServiceStub, target: Target, score: MethodScore, **fields: Any
) -> inference_pb2.PredictResponse | None:
    """One Predict call; a refusal is recorded as the method's ``error`` (None returned)."""
    try:
        return stub.Predict(
            inference_pb2.PredictRequest(**fields), metadata=target.metadata(), timeout=600
        )
    except grpc.RpcError as exc:
        score.error = f"{exc.code().name}: {exc.details()}"
        return None


def score_methods(
    target: Target,
    methods: Sequence[str],
    stream: Sequence[StreamExample],
    expert_of_task: dict[str, str],
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
    max_new_tokens: int = 0,
    match: Match = None,
) -> list[MethodScore]:
    """:func:`score_method` for each method in turn; a method the coordinator refuses (not
    trained, unknown) comes back with ``error`` set rather than stopping the others."""
    return [
        score_method(target, m, stream, expert_of_task, batch_size, on_batch, max_new_tokens, match)
        for m in methods
    ]


def _tally(
    score: MethodScore, ex: StreamExample, routed_task: str, output: str, match: Match = None
) -> None:
    score.examples += 1
    score.routed_right += routed_task == ex.task
    score.labelled_right += match(output, ex.label) if match else output == ex.label
    score.confusion[(ex.task, routed_task)] += 1
    score.outputs.append((ex, output))


def save_confusion_png(score: MethodScore, tasks: Sequence[str], path: Path) -> Path:
    """Routing confusion matrix (rows: source task, columns: routed task) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = [[score.confusion[(s, r)] for r in tasks] for s in tasks]
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 3, 1.0 * len(tasks) + 2.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("routed to expert of task")
    ax.set_ylabel("source task")
    ax.set_title(f"routing confusion: {score.method} ({score.routing_accuracy:.1%})")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                color="white" if value > peak / 2 else "black",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- labelled data from a user: ``moerge evaluate DATA.jsonl`` -------------------------------------


class LabelledDataError(ValueError):
    """A labelled JSONL file that cannot be evaluated; the message names the line."""


@dataclass(frozen=True)
class LabelledRow:
    """One line of a labelled file: the example and the task or expert it belongs to."""

    line: int
    text: str
    label: str
    task: str  # a registered expert's task name ("" when ``expert`` is given)
    expert: str  # an expert id, unique id prefix or name ("" when ``task`` is given)


def read_labelled(lines: Iterable[str], source: str = "DATA") -> list[LabelledRow]:
    """Parse JSON Lines of ``{"text", "label", "task" | "expert"}``; blank lines are skipped.

    Texts may span lines inside their JSON string (``\\n``); a label may be a number (read as
    its text). Errors say ``SOURCE:LINE: what is wrong``.
    """
    rows: list[LabelledRow] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise LabelledDataError(f"{where}: not JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict):
            raise LabelledDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text, label = record.get("text"), record.get("label")
        if not isinstance(text, str) or not text.strip():
            raise LabelledDataError(f'{where}: "text" must be a non-empty string')
        if isinstance(label, bool) or not isinstance(label, str | int | float):
            raise LabelledDataError(f'{where}: "label" must be a string or a number')
        task, expert = record.get("task", ""), record.get("expert", "")
        if not isinstance(task, str) or not isinstance(expert, str) or bool(task) == bool(expert):
            raise LabelledDataError(
                f'{where}: give exactly one of "task" (a registered task name) or '
                '"expert" (an expert id or name)'
            )
        rows.append(LabelledRow(number, text, str(label), task, expert))
    if not rows:
        raise LabelledDataError(f"{source}: no examples")
    return rows


def assign_tasks(
    rows: Sequence[LabelledRow], experts: Sequence[tuple[str, str, str]], source: str = "DATA"
) -> list[StreamExample]:
    """Each row's source task among the registered ``(expert_id, name, task_name)`` experts.

    An ``expert`` is matched by name, full id or unique id prefix and stands for its task. A
    task no registered expert serves is refused, naming the line and the tasks there are.
    """
    tasks = {task for _, _, task in experts}
    stream: list[StreamExample] = []
    for row in rows:
        where = f"{source}:{row.line}"
        if row.task:
            if row.task not in tasks:
                raise LabelledDataError(
                    f"{where}: no registered expert serves task {row.task!r} "
                    f"(tasks: {', '.join(sorted(tasks)) or 'none'})"
                )
            stream.append(StreamExample(row.text, row.label, row.task))
            continue
        found = {t for i, n, t in experts if row.expert in (i, n)}
        found = found or {t for i, _, t in experts if i.startswith(row.expert.lower())}
        if len(found) != 1:
            why = "is ambiguous" if found else "matches no registered expert"
            raise LabelledDataError(f"{where}: expert {row.expert!r} {why}")
        stream.append(StreamExample(row.text, row.label, found.pop()))
    return stream


@dataclass(frozen=True)
class MajorityFloor:
    """Always answering each task's most common label, counted on the evaluated labels."""

    by_task: dict[str, tuple[str, int, int]]  # task -> (label, its count, examples)

    @property
    def accuracy(self) -> float:
        """The floor's accuracy over all tasks' examples together (0 for none)."""
        right = sum(count for _, count, _ in self.by_task.values())
        total = sum(n for _, _, n in self.by_task.values())
        return right / total if total else 0.0


def majority_floor(stream: Sequence[StreamExample]) -> MajorityFloor:
    """The majority-class floor of ``stream``, from its own labels, per task."""
    labels: dict[str, Counter[str]] = {}
    for ex in stream:
        labels.setdefault(ex.task, Counter())[ex.label] += 1
    return MajorityFloor(
        {
            task: (*counts.most_common(1)[0], sum(counts.values()))
            for task, counts in sorted(labels.items())
        }
    )


@dataclass
class Evaluation:
    """Everything ``moerge evaluate`` reports about one labelled file."""

    tasks: list[str]
    metric: str  # how a right answer is decided
    scores: list[MethodScore]  # the oracle first; methods with ``error`` set were skipped
    floor: MajorityFloor

    @property
    def examples(self) -> int:
        """How many labelled examples were evaluated."""
        return sum(n for _, _, n in self.floor.by_task.values())

    def best_router(self) -> MethodScore | None:
        """The scored router (not the oracle nor uniform) with the best routing accuracy."""
        routers = [s for s in self.scores if s.method not in ("oracle", "uniform") and not s.error]
        return max(routers, key=lambda s: s.routing_accuracy, default=None)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON values: numbers as numbers, the confusion as nested task counts."""
        return {
            "examples": self.examples,
            "tasks": self.tasks,
            "metric": self.metric,
            "majority_floor": {
                "source": "the evaluated file's own labels, per task",
                "accuracy": self.floor.accuracy,
                "by_task": {
                    task: {"label": label, "accuracy": count / n, "examples": n}
                    for task, (label, count, n) in self.floor.by_task.items()
                },
            },
            "methods": [
                {
                    "method": s.method,
                    "routing_accuracy": s.routing_accuracy,
                    "task_accuracy": s.task_accuracy,
                    "examples": s.examples,
                    "seconds": s.seconds,
                    "confusion": _nested(s.confusion),
                }
                for s in self.scores
                if not s.error
            ],
            "skipped": [{"method": s.method, "reason": s.error} for s in self.scores if s.error],
        }


def _nested(confusion: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (source, routed), n in sorted(confusion.items()):
        out.setdefault(source, {})[routed] = n
    return out


def evaluate(
    target: Target,
    stream: Sequence[StreamExample],
    methods: Sequence[str],
    expert_of_task: dict[str, str],
    causal_lm: bool = False,
    batch_size: int = 32,
    max_new_tokens: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """Score the oracle and ``methods`` on ``stream``, beside its majority-class floor."""
    match: Match = None
    if causal_lm:
        from moerge.answers import answers_match

        match = answers_match
    ordered = ["oracle", *(m for m in dict.fromkeys(methods) if m != "oracle")]
    scores = score_methods(
        target, ordered, stream, expert_of_task, batch_size, on_batch, max_new_tokens, match
    )
    metric = "exact match of the normalised generated text" if causal_lm else "label equality"
    tasks = sorted({ex.task for ex in stream})
    return Evaluation(tasks, metric, scores, majority_floor(stream))
