"""``moerge evaluate DATA.jsonl`` against a real coordinator with two uploaded tiny experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moerge
from moerge.cli import app
from moerge.evaluation import LabelledDataError, StreamExample, majority_floor, read_labelled
from tests.client.test_cli import served  # noqa: F401 (a fixture: experts t0 and t1)
from tests.coordinator.harness import BackgroundCoordinator

ROWS = [
    {"text": "the film was a delight", "label": "pos", "task": "t0"},
    {"text": "a dull, tired plot", "label": "neg", "task": "t0"},
    {"text": "what a lovely\nending", "label": "pos", "task": "t0"},
    {"text": "the striker scored twice", "label": "sport", "task": "t1"},
    {"text": "a new phone chip", "label": "tech", "task": "t1"},
    {"text": "the bank cut rates", "label": "money", "task": "t1"},
    {"text": "markets fell", "label": "money", "expert": "expert1"},
]


@pytest.fixture
def evaluated(served: dict, running: BackgroundCoordinator) -> dict[str, object]:  # noqa: F811
    """test_cli's experts "expert0" (task t0) and "expert1" (t1), and a centroid router."""
    with moerge.Client(running.address, token=running.admin_token()) as api:
        api.train_router("centroid")
    return {**served, "address": running.address, "token": running.admin_token()}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def test_json_scores_the_oracle_every_ready_router_and_the_majority_floor(
    evaluated: dict, tmp_path: Path
) -> None:
    data = _write(tmp_path / "data.jsonl", ROWS)
    plot = tmp_path / "out" / "confusion.png"
    result = _invoke("evaluate", str(data), *evaluated["admin"], "--json", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["examples"] == 7 and report["tasks"] == ["t0", "t1"]
    methods = {m["method"]: m for m in report["methods"]}
    skipped = {s["method"]: s["reason"] for s in report["skipped"]}
    assert set(methods) | set(skipped) == {"oracle", "centroid", "uniform"}
    oracle = methods["oracle"]
    assert oracle["routing_accuracy"] == 1.0
    assert oracle["confusion"] == {"t0": {"t0": 3}, "t1": {"t1": 4}}
    assert "centroid" in methods  # the trained router is scored
    # the oracle's task accuracy is what each task's own expert answers, asked directly
    with moerge.Client(evaluated["address"], token=evaluated["token"]) as api:
        right = 0
        for i, task in enumerate(("t0", "t1")):
            rows = [r for r in ROWS if r.get("task") == task or r.get("expert") == f"expert{i}"]
            outputs = api.predict([r["text"] for r in rows], experts=[evaluated["ids"][i]], top_k=1)
            pairs = zip(outputs.predictions, rows, strict=True)
            right += sum(p.output == r["label"] for p, r in pairs)
    assert oracle["task_accuracy"] == pytest.approx(right / 7)
    floor = report["majority_floor"]
    assert floor["by_task"]["t0"] == {"label": "pos", "accuracy": 2 / 3, "examples": 3}
    assert floor["by_task"]["t1"] == {"label": "money", "accuracy": 2 / 4, "examples": 4}
    assert floor["accuracy"] == pytest.approx(4 / 7)
    assert "own labels" in floor["source"]
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_table_lists_methods_beside_the_oracle_and_the_floor(
    evaluated: dict, tmp_path: Path
) -> None:
    data = _write(tmp_path / "data.jsonl", ROWS)
    result = _invoke("evaluate", str(data), *evaluated["admin"], "--methods", "centroid,qda")
    assert result.exit_code == 0, result.output
    assert "7 labelled examples from 2 tasks" in result.stdout
    for word in ("oracle", "centroid", "majority floor", "from this file's own labels"):
        assert word in result.stdout
    qda = next(line for line in result.stdout.splitlines() if "qda" in line)
    assert "skipped" in qda  # no qda router was trained: reported, not a crash
    assert "majority floor of t1: 'money' 2/4 = 50.0%" in result.stdout


def test_a_task_no_expert_serves_is_refused_naming_the_line(
    evaluated: dict, tmp_path: Path
) -> None:
    data = _write(tmp_path / "data.jsonl", [*ROWS[:2], {"text": "x", "label": "a", "task": "t9"}])
    result = _invoke("evaluate", str(data), *evaluated["admin"])
    assert result.exit_code == 1
    assert "data.jsonl:3: no registered expert serves task 't9' (tasks: t0, t1)" in result.stderr


def test_a_user_api_key_evaluates_as_the_admin_does(evaluated: dict, tmp_path: Path) -> None:
    """Evaluate needs only what Predict serves (ListModels): an inference-only key suffices."""
    data = _write(tmp_path / "data.jsonl", ROWS)
    with moerge.Client(evaluated["address"], token=evaluated["token"]) as api:
        key = api.create_api_key(note="evaluate").api_key
    as_user = _invoke("evaluate", str(data), "-c", evaluated["address"], "--token", key, "--json")
    assert as_user.exit_code == 0, as_user.output
    as_admin = _invoke("evaluate", str(data), *evaluated["admin"], "--json")
    user, admin = json.loads(as_user.stdout), json.loads(as_admin.stdout)
    scored = {m["method"]: m for m in user["methods"]}
    assert "centroid" in scored and scored["oracle"]["routing_accuracy"] == 1.0
    assert {s["method"] for s in user["skipped"]} == {s["method"] for s in admin["skipped"]}
    for method in admin["methods"]:  # the same experts, routers and answers
        ours = scored[method["method"]]
        assert (ours["routing_accuracy"], ours["task_accuracy"], ours["confusion"]) == (
            method["routing_accuracy"],
            method["task_accuracy"],
            method["confusion"],
        )


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    good = json.dumps(ROWS[0])
    cases = {
        f"{good}\n\n{{not json\n": "f.jsonl:3: not JSON",
        f'{good}\n{{"text": "a", "label": "b"}}\n': 'f.jsonl:2: give exactly one of "task"',
        '{"text": "", "label": "b", "task": "t"}\n': 'f.jsonl:1: "text" must be',
        "[1, 2]\n": "f.jsonl:1: expected a JSON object",
        "\n": "f.jsonl: no examples",
    }
    for content, message in cases.items():
        with pytest.raises(LabelledDataError, match=message):
            read_labelled(content.splitlines(), "f.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{good}\n{{oops\n")
    result = _invoke("evaluate", str(bad), "-c", "127.0.0.1:1")
    assert result.exit_code == 1
    assert "bad.jsonl:2: not JSON" in result.stderr


def test_majority_floor_counts_each_tasks_own_labels() -> None:
    stream = [
        StreamExample("a", y, t)
        for t, y in [("x", "1"), ("x", "1"), ("x", "2"), ("y", "3"), ("y", "4")]
    ]
    floor = majority_floor(stream)
    assert floor.by_task == {"x": ("1", 2, 3), "y": ("3", 1, 2)}
    assert floor.accuracy == pytest.approx(3 / 5)
