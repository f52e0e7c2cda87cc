"""Score routing methods on a mixed stream of held-out examples, through the public Predict API.

Used by ``moerge demo`` and ``benchmarks/routing_quality.py``. Each example knows its source task
(hence the expert that should serve it) and its true label; nothing here looks inside the
coordinator. *Routing accuracy* is the share of examples whose highest-weight expert is their
source task's expert; *task accuracy* the share whose predicted label is the true label.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass(frozen=True)
class StreamExample:
    text: str
    label: str
    task: str


@dataclass
class MethodScore:
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
        return self.routed_right / self.examples if self.examples else 0.0

    @property
    def task_accuracy(self) -> float:
        return self.labelled_right / self.examples if self.examples else 0.0


def mixed_stream(tests: dict[str, Sequence[tuple[str, str]]], seed: int = 0) -> list[StreamExample]:
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
) -> MethodScore:
    """Send the stream to Predict with one method; tally routing and task accuracy.

    ``max_new_tokens`` bounds generation for causal LMs (0: the coordinator's default).
    """
    if method == "oracle":
        return score_assigned(
            target, method, stream, [ex.task for ex in stream], expert_of_task, batch_size,
            on_batch, max_new_tokens,
        )
    routing_method, aggregation, top_k = METHODS[method]
    task_of_expert = {e: t for t, e in expert_of_task.items()}
    score = MethodScore(method)
    started = time.perf_counter()
    with target.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for start in range(0, len(stream), batch_size):
            batch = stream[start : start + batch_size]
            try:
                response = stub.Predict(
                    inference_pb2.PredictRequest(
                        inputs=[ex.text for ex in batch],
                        routing_method=routing_method,
                        aggregation=aggregation,
                        top_k=top_k,
                        max_new_tokens=max_new_tokens,
                    ),
                    metadata=target.metadata(),
                    timeout=600,
                )
            except grpc.RpcError as exc:
                score.error = f"{exc.code().name}: {exc.details()}"
                return score
            for ex, prediction in zip(batch, response.predictions, strict=True):
                top = max(prediction.experts, key=lambda e: e.weight, default=None)
                routed = task_of_expert.get(top.expert_id, "?") if top else "-"  # "-": no expert
                _tally(score, ex, routed, prediction.output)
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
                response = stub.Predict(
                    inference_pb2.PredictRequest(
                        inputs=[ex.text for ex in batch],
                        expert_ids=[expert_of_task[task]],
                        top_k=1,
                        aggregation=inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE,
                        max_new_tokens=max_new_tokens,
                    ),
                    metadata=target.metadata(),
                    timeout=600,
                )
                for ex, prediction in zip(batch, response.predictions, strict=True):
                    _tally(score, ex, task, prediction.output)
                if on_batch:
                    on_batch(len(batch))
    score.seconds = time.perf_counter() - started
    return score


def _tally(score: MethodScore, ex: StreamExample, routed_task: str, output: str) -> None:
    score.examples += 1
    score.routed_right += routed_task == ex.task
    score.labelled_right += output == ex.label
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
