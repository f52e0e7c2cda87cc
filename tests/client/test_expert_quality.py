"""The quality ``moerge train`` records in statistics.json reaches admins and the contributor."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import moerge
from moerge.cli import app
from moerge.expert_format import STATISTICS_META
from tests.coordinator.harness import BackgroundCoordinator
from tests.experts import make_expert_dir, rewrite_json

#: What `moerge train` writes for an expert that beats the majority class but not the probe.
QUALITY = {
    "validation_examples": 40,
    "validation_accuracy": 0.625,
    "probe_accuracy": 0.7,
    "majority_accuracy": 0.5,
    "validation_loss": 0.81,
    "base_validation_loss": None,
}


def _upload(running: BackgroundCoordinator, folder: Path, name: str) -> str:
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        invite = admin.create_enrollment_token().token
    with moerge.Client(running.address) as lab:
        lab.join(invite, "lab")
        return lab.upload(folder, name).expert.expert_id


def test_admin_experts_show_gives_the_quality_recorded_at_training(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    folder = make_expert_dir(tiny_bert, tmp_path / "expert")
    rewrite_json(folder / STATISTICS_META, quality=QUALITY)
    expert_id = _upload(running, folder, "weak")
    admin = ["-c", running.address, "--token", running.admin_token()]

    shown = CliRunner().invoke(app, ["admin", "experts", "show", expert_id[:8], *admin])
    assert shown.exit_code == 0, shown.output
    assert "quality (40 validation examples)" in shown.stdout
    table = shown.stdout[shown.stdout.index(" figure ") :]  # the quality table, after the fields
    for figure, value in [
        ("validation_accuracy", "0.625"),
        ("linear_probe_accuracy", "0.7"),
        ("majority_accuracy", "0.5"),
        ("validation_loss", "0.81"),
    ]:
        assert any(figure in line and value in line for line in table.splitlines()), figure
    assert "base_validation_loss" not in table  # not measured: left out, not shown as 0
    assert "does not beat a linear probe on the base model (0.700)" in shown.stderr

    as_json = CliRunner().invoke(app, ["admin", "experts", "show", expert_id, *admin, "--json"])
    assert json.loads(as_json.stdout)["quality"] == QUALITY

    mine = CliRunner().invoke(app, ["my-experts", "-c", running.address])
    assert "accuracy 0.625 (probe 0.700, majority 0.500)" in mine.stdout


def test_an_expert_without_recorded_quality_shows_none(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    expert_id = _upload(running, make_expert_dir(tiny_bert, tmp_path / "expert"), "old")
    admin = ["-c", running.address, "--token", running.admin_token()]
    shown = CliRunner().invoke(app, ["admin", "experts", "show", expert_id, *admin, "--json"])
    assert json.loads(shown.stdout)["quality"] is None
    table = CliRunner().invoke(app, ["admin", "experts", "show", expert_id, *admin])
    assert "quality (" not in table.stdout
