"""Few-shot composition end to end: Compose streams progress, stores a version, Predict pins it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

import moerge
from moerge.results import ComposeProgress, Composition
from tests.coordinator.harness import BackgroundCoordinator
from tests.experts import make_expert_dir

EXAMPLES = [
    ("the film was great", "pos"),
    ("a dull, tired plot", "neg"),
    ("what a delight", "pos"),
    ("I want my money back", "neg"),
    ("superb acting", "pos"),
]


@pytest.fixture
def experts(running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path) -> list[str]:
    """Two sentiment experts (neg/pos) and one topic expert, uploaded by one contributor."""
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        invite = admin.create_enrollment_token(note="lab")
    with moerge.Client(running.address) as client:
        client.join(invite.token, "lab")
        ids = []
        for i, labels in enumerate((("neg", "pos"), ("pos", "neg"), ("sport", "tech"))):
            folder = make_expert_dir(
                tiny_bert, tmp_path / f"e{i}", labels=labels, seed=i, task_name=f"task{i}"
            )
            ids.append(client.upload(folder, f"expert{i}").expert.expert_id)
    return ids


def test_compose_streams_progress_then_stores_a_version_that_predict_serves(
    running: BackgroundCoordinator, experts: list[str]
) -> None:
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        events = list(admin.compose("reviews", EXAMPLES, budget=6, seed=1))
        progress, done = events[:-1], events[-1]
        assert [p.evaluations for p in progress] == [1, 2, 3, 4, 5, 6]
        assert all(isinstance(p, ComposeProgress) and p.budget == 6 for p in progress)
        assert isinstance(done, Composition) and (done.name, done.version) == ("reviews", 1)
        # the topic expert's labels do not cover neg/pos, so only the sentiment experts take part
        assert sorted(e.expert_id for e in done.experts) == sorted(experts[:2])
        # the search minimises loss + 0.05 * mean|w| from the uniform merge (mean|w| = 1/2), so
        # the loss kept may exceed the start's by the L1 term it saved, never by more
        assert done.loss <= done.start_loss + 0.05 * 0.5 and done.evaluations == 6
        assert done.example_count == 5 and not done.examples_kept
        assert set(done.label_names) == {"neg", "pos"} and done.stopped_by == "budget"

        served = admin.predict(["a wonderful film", "awful"], composition="reviews")
        assert served.routing_method == "composition" and served.router_version == 0
        assert served.note.startswith("composition reviews v1")
        weights = {e.expert_id: e.weight for e in done.experts}
        for prediction in served.predictions:
            assert prediction.output in {"neg", "pos"}
            assert {e.expert_id: e.weight for e in prediction.experts} == pytest.approx(weights)

        again = list(
            admin.compose(
                "reviews", EXAMPLES[:3], experts=[experts[0]], budget=2, keep_examples=True
            )
        )[-1]
        assert again.version == 2 and again.examples_kept
        assert [c.version for c in admin.compositions("reviews")] == [2, 1]
        pinned = admin.predict(["fine"], composition="reviews", composition_version=1)
        assert pinned.note.startswith("composition reviews v1")


def test_composition_requests_that_cannot_work_are_refused_with_the_right_code(
    running: BackgroundCoordinator, experts: list[str]
) -> None:
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        cases = [
            (lambda: admin.predict(["x"], composition="missing"), grpc.StatusCode.NOT_FOUND),
            (
                lambda: list(
                    admin.compose("mixed", EXAMPLES, experts=[experts[0], experts[2]], budget=2)
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
            (
                lambda: list(admin.compose("none", [("a goal", "football")], budget=2)),
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
            (lambda: list(admin.compose("empty", [], budget=2)), grpc.StatusCode.INVALID_ARGUMENT),
            (
                lambda: list(admin.compose("big", EXAMPLES, budget=100_000)),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]
        for call, code in cases:
            with pytest.raises(moerge.MoergeError) as caught:
                call()
            assert caught.value.code == code
        list(admin.compose("ok", EXAMPLES, budget=1))
        with pytest.raises(moerge.MoergeError) as caught:
            admin.predict(["x"], composition="ok", method="centroid")
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert admin.compositions("mixed") == []


def test_the_async_client_streams_the_same_events(
    running: BackgroundCoordinator, experts: list[str]
) -> None:
    async def main() -> list[object]:
        async with moerge.AsyncClient(running.address, token=running.admin_token()) as client:
            return [event async for event in client.compose("async", EXAMPLES, budget=2)]

    events = asyncio.run(main())
    assert [type(e) for e in events] == [ComposeProgress, ComposeProgress, Composition]


def test_the_cli_composes_from_a_jsonl_file_lists_it_and_predicts_with_it(
    running: BackgroundCoordinator, experts: list[str], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from moerge.cli import app

    admin = ["-c", running.address, "--token", running.admin_token()]
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in EXAMPLES))
    runner = CliRunner()
    created = runner.invoke(
        app,
        [
            "compose",
            "create",
            "cli",
            str(data),
            "--budget",
            "3",
            "--expert",
            experts[0][:8],
            "--expert",
            experts[1][:8],
            *admin,
            "--json",
        ],
    )
    assert created.exit_code == 0, created.output
    stored = json.loads(created.stdout)
    assert (stored["name"], stored["version"], stored["evaluations"]) == ("cli", 1, 3)
    table = runner.invoke(app, ["compose", "list", *admin])
    assert table.exit_code == 0 and "cli" in table.stdout
    predicted = runner.invoke(
        app, ["predict", "a fine film", "--composition", "cli", *admin, "--json"]
    )
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)["routing_method"] == "composition"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no label"}\n')
    refused = runner.invoke(app, ["compose", "create", "bad", str(bad), *admin])
    assert refused.exit_code == 2 and "expected a JSON object" in " ".join(refused.output.split())


def test_compose_create_reads_its_examples_from_stdin_given_a_dash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # sys.stdin, not click's get_text_stream (deprecated, gone in Click 9)
    import io

    from moerge.cli.compose import read_examples

    lines = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in EXAMPLES[:2])
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert read_examples(Path("-")) == EXAMPLES[:2]


def test_leaving_the_stream_cancels_the_search_and_stores_nothing(
    running: BackgroundCoordinator, experts: list[str]
) -> None:
    import time

    with moerge.Client(running.address, token=running.admin_token()) as admin:
        events = admin.compose("cancelled", EXAMPLES, budget=1000, time_limit_s=600)
        assert isinstance(next(events), ComposeProgress)
        events.close()  # cancels the call
        deadline = time.monotonic() + 30
        while True:  # the coordinator frees its one search slot once the search has stopped
            try:
                done = list(admin.compose("after", EXAMPLES, budget=1))[-1]
                break
            except moerge.MoergeError as exc:
                assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert done.name == "after"
        assert admin.compositions("cancelled") == []
