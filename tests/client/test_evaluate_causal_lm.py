"""``moerge evaluate`` on a causal-LM coordinator: task accuracy is normalised exact match."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import moerge
from moerge.cli import app
from tests.coordinator.conftest import tiny_llama  # noqa: F401 (fixture)
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_generate import served  # noqa: F401 (fixture: experts task0, task1)

PROMPTS = {"task0": ["the film was", "a story of"], "task1": ["shares fell", "the bank"]}


def test_generated_answers_count_right_up_to_case_quotes_and_final_punctuation(
    served: BackgroundCoordinator,  # noqa: F811
    tmp_path: Path,
) -> None:
    with moerge.Client(served.address, token=served.admin_token()) as api:
        expert_of = {e.task_name: e.expert_id for e in api.list_experts().items}
        rows = []
        for task, prompts in PROMPTS.items():
            answers = api.predict(prompts, experts=[expert_of[task]], top_k=1, max_new_tokens=4)
            first, second = (p.output for p in answers.predictions)
            rows.append({"text": prompts[0], "task": task, "label": f'"{first.upper()}."'})
            rows.append({"text": prompts[1], "task": task, "label": second + " and more"})
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, [
        "evaluate", str(data), "-c", served.address, "--token", served.admin_token(),
        "--methods", "", "--max-new-tokens", "4", "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metric"] == "exact match of the normalised generated text"
    (oracle,) = report["methods"]
    assert oracle["method"] == "oracle" and oracle["routing_accuracy"] == 1.0
    assert oracle["task_accuracy"] == 0.5  # the quoted upper-case answers match, the longer not
