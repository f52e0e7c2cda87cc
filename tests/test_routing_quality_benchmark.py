"""The routing-quality benchmark's own pieces, on tiny synthetic data (no expert is trained).

The raw-data ceiling, the tables and goals built from scores, and the scoring of routing that the
caller decides (oracle, ceiling) through a real coordinator's Predict with tiny experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.evaluation import MethodScore, StreamExample, mixed_stream, score_assigned
from tests.benchmark_scripts import load_benchmark
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir
from tests.tiny_models import make_tiny_bert


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("routing_quality")


def _clusters(n_per_class: tuple[int, ...], dim: int = 16, seed: int = 0):
    """Unit-norm points around one fixed random direction per class: x [N, dim], y [N]."""
    centres = torch.randn(len(n_per_class), dim, generator=torch.Generator().manual_seed(0))
    centres = torch.nn.functional.normalize(centres, dim=1)
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for label, n in enumerate(n_per_class):
        xs.append(centres[label] + 0.2 * torch.randn(n, dim, generator=g))
        ys.append(torch.full((n,), label))
    return torch.nn.functional.normalize(torch.cat(xs), dim=1), torch.cat(ys)


def test_logistic_ceiling_recovers_separable_tasks_even_when_unbalanced(bench) -> None:
    x, y = _clusters((300, 60, 120))
    x_test, y_test = _clusters((50, 50, 50), seed=1)
    ceiling = bench.fit_logistic(x, y, num_classes=3)
    assert ceiling.weight.shape == (3, 16) and ceiling.bias.shape == (3,)
    predicted = ceiling.predict(x_test)
    for label in range(3):  # the small class is not sacrificed to the large one
        recall = (predicted[y_test == label] == label).float().mean().item()
        assert recall > 0.9, (label, recall)


def _score(method: str, routed: dict[tuple[str, str], int], labelled_right: int) -> MethodScore:
    score = MethodScore(method)
    score.confusion.update(routed)
    score.examples = sum(routed.values())
    score.routed_right = sum(n for (s, r), n in routed.items() if s == r)
    score.labelled_right = labelled_right
    return score


def test_tables_give_shares_of_the_oracle_and_the_ceiling_and_judge_the_goals(bench) -> None:
    scores = [
        _score("oracle", {("a", "a"): 50, ("b", "b"): 50}, 80),
        _score(bench.CEILING, {("a", "a"): 50, ("b", "b"): 50}, 80),
        _score("centroid", {("a", "a"): 50, ("b", "b"): 49, ("b", "a"): 1}, 78),
        _score("lda", {("a", "a"): 40, ("a", "b"): 10, ("b", "b"): 50}, 70),
        _score("uniform", {("a", "a"): 50, ("b", "a"): 50}, 72),
        MethodScore("base", error="FAILED_PRECONDITION: no head"),
    ]
    table = "\n".join(bench.score_table(scores, {"centroid": 0.5}, "oracle", bench.CEILING))
    assert "| centroid | 99.0% | 99.0% | 78.0% | 97.5% | 0.50 |" in table
    assert "| lda | 90.0% | 90.0% | 70.0% | 87.5% |" in table
    assert "| base | - | - | - | - | - | FAILED_PRECONDITION: no head |" in table
    per_task = "\n".join(bench.per_task_routing(scores, ["a", "b"]))
    assert "| lda | 80.0% | 100.0% |" in per_task
    goals = bench.goals(scores, "oracle", bench.CEILING)
    assert "centroid 97.5% - **met**" in goals[0]
    assert "centroid 99.0% - **met**" in goals[1]
    assert goals[2].endswith("**not met** (not: lda)")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Target, dict[str, str]]]:
    """A coordinator with one tiny expert per task; the admin target and task -> expert id."""
    tmp = tmp_path_factory.mktemp("rq")
    tiny_bert = make_tiny_bert(tmp / "tiny-bert")
    with BackgroundCoordinator(coordinator_config(tmp / "data", tiny_bert)) as running:
        _, credential = enroll(running.address, running.admin_token(), "lab")
        contributor = Target(address=running.address, token=credential)
        expert_of_task = {}
        for i, (task, labels) in enumerate((("a", ("neg", "pos")), ("b", ("x", "y", "z")))):
            folder = make_expert_dir(tiny_bert, tmp / task, labels=labels, seed=i, task_name=task)
            uploaded = upload_expert(contributor, folder, f"expert-{task}", task, progress=False)
            expert_of_task[task] = uploaded.expert.expert_id
        yield Target(address=running.address, token=running.admin_token()), expert_of_task


def test_assigned_routing_sends_each_example_to_the_chosen_expert(served) -> None:
    admin, expert_of_task = served
    tests = {"a": [("good", "pos"), ("bad", "neg")], "b": [("one", "x"), ("two", "y"), ("3", "z")]}
    stream = mixed_stream(tests, seed=0)
    oracle = score_assigned(admin, "oracle", stream, [ex.task for ex in stream], expert_of_task)
    swapped = [{"a": "b", "b": "a"}[ex.task] for ex in stream]
    wrong = score_assigned(admin, "wrong", stream, swapped, expert_of_task, batch_size=2)
    assert oracle.examples == wrong.examples == 5
    assert oracle.routing_accuracy == 1.0 and wrong.routing_accuracy == 0.0
    assert wrong.confusion[("a", "b")] == 2 and wrong.confusion[("b", "a")] == 3
    # an expert answers with its own labels only: the swapped one can never be right
    assert wrong.task_accuracy == 0.0
    assert isinstance(stream[0], StreamExample)
