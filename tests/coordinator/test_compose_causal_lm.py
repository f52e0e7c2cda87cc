"""Few-shot composition on a causal-LM coordinator: Compose scores the answers' likelihood,
Generate and Predict serve the stored composition pinned by name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import moerge
from moerge.results import Composition, GenerateEnd, GenerateStart
from tests.coordinator.causal_lm import TINY_LLAMA_SETTINGS
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.experts import make_expert_dir

EXAMPLES = [("Define: harbour", "port"), ("Define: canine", "dog"), ("Define: feline", "cat")]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path
) -> Iterator[BackgroundCoordinator]:
    root = tmp_path_factory.mktemp("compose-lm")
    config = coordinator_config(root / "data", tiny_llama, **TINY_LLAMA_SETTINGS)
    with BackgroundCoordinator(config) as running:
        with moerge.Client(running.address, token=running.admin_token()) as admin:
            invite = admin.create_enrollment_token(note="lab").token
        with moerge.Client(running.address) as lab:
            lab.join(invite, "lab")
            for i in range(2):
                folder = make_expert_dir(
                    tiny_llama,
                    root / f"lm{i}",
                    rank=4,
                    seed=10 + i,
                    task_type="causal_lm",
                    task_name=f"task{i}",
                )
                lab.upload(folder, f"lm{i}")
        yield running


def test_a_causal_lm_composition_is_searched_on_answers_and_served_by_generate_and_predict(
    served: BackgroundCoordinator,
) -> None:
    with moerge.Client(served.address, token=served.admin_token()) as admin:
        done = list(admin.compose("define", EXAMPLES, budget=3))[-1]
        assert isinstance(done, Composition) and done.evaluations == 3
        assert len(done.experts) == 2 and done.label_names == ()
        assert 0.0 <= done.loss <= done.start_loss  # answers' mean NLL per token
        weights = {e.expert_id: e.weight for e in done.experts}

        events = list(admin.generate("Define: harbour", composition="define", max_new_tokens=4))
        start, end = events[0], events[-1]
        assert isinstance(start, GenerateStart) and isinstance(end, GenerateEnd)
        assert start.routing_method == "composition" and start.note == "composition define v1"
        assert {e.expert_id: e.weight for e in start.experts} == pytest.approx(weights)
        text = "".join(e.text for e in events[1:-1])

        predicted = admin.predict(["Define: harbour"], composition="define", max_new_tokens=4)
        assert predicted.predictions[0].output == text  # both greedy under the same merge
        with pytest.raises(moerge.MoergeError, match="composition fixes its experts"):
            list(admin.generate("x", composition="define", method="centroid"))


def test_moerge_generate_takes_a_composition(served: BackgroundCoordinator) -> None:
    import json

    from typer.testing import CliRunner

    from moerge.cli import app

    admin = ["-c", served.address, "--token", served.admin_token()]
    with moerge.Client(served.address, token=served.admin_token()) as client:
        list(client.compose("cli-define", EXAMPLES[:2], budget=2))
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "Define: canine",
            "--composition",
            "cli-define",
            "--max-new-tokens",
            "3",
            *admin,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout.splitlines()[0])
    assert first["GenerateStart"]["routing_method"] == "composition"
