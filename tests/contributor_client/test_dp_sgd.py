"""DP-SGD for the adapter and the gates with Opacus: one noise multiplier for both
runs, accounted together with the statistics' release in the privacy report."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from moerge.cli import app
from moerge.contributor_client.build import build_expert
from moerge.contributor_client.dp_sgd import DPSGDConfig, adapter_steps, calibrate
from moerge.contributor_client.gates import GateConfig
from moerge.contributor_client.privacy import composed_epsilon, dp_sgd_event
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.training import train_expert
from moerge.expert_format import ADAPTER_WEIGHTS, STATISTICS_META, StatisticsMeta

from .toy import toy_config, toy_examples, write_jsonl


def test_one_noise_multiplier_spends_the_budget_over_both_runs() -> None:
    config = DPSGDConfig(epsilon=8.0, delta=1e-5, gate_steps=100, gate_examples=500)
    runs = config.runs(450, epochs=3)
    assert runs[0] == adapter_steps(config, 450, 3) and runs[1] == (64 / 500, 100)
    sigma = calibrate(config, runs)
    spent = composed_epsilon([dp_sgd_event(sigma, q, t) for q, t in runs], 1e-5)
    assert 0.97 * 8.0 <= spent <= 8.0 + 1e-6


def test_dp_sgd_expert_reports_every_release_and_keeps_quality_local(
    tiny_bert: Path, tmp_path: Path
) -> None:
    texts, labels = toy_examples(80)
    data = write_jsonl(tmp_path / "data.jsonl", texts, labels)
    dp_sgd = DPSGDConfig(epsilon=8.0, min_steps=6, batch_size=16, gate_batch_size=16)
    report = build_expert(
        data,
        tmp_path / "expert",
        "toy",
        toy_config(tiny_bert, epochs=1),
        gate_config=GateConfig(steps=4),
        dp_sgd=dp_sgd,
        progress=False,
    )
    meta = StatisticsMeta.read(tmp_path / "expert" / STATISTICS_META)
    privacy = meta.privacy
    assert privacy is not None and privacy.all_dp and not privacy.statistics_opt_out
    assert [(r.what, r.mechanism) for r in privacy.releases] == [
        ("statistics", "gaussian_pld"),
        ("adapter", "dp_sgd"),
        ("gates", "dp_sgd"),
    ]
    adapter, gates = privacy.release("adapter"), privacy.release("gates")
    assert adapter.details["noise_multiplier"] == gates.details["noise_multiplier"]
    assert adapter.details["library"] == "opacus" and adapter.details["steps"] >= 6
    assert adapter.details["parameters"] == "head" and gates.details["parameters"] == "gates"
    weights = load_file(str(tmp_path / "expert" / ADAPTER_WEIGHTS))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) == 0.0 for v in lora_b)  # head only by default
    head = weights["base_model.model.classifier.weight"]
    assert float(head.abs().max()) > 0.0
    # adapter + gates spend the DP-SGD budget; the statistics' release comes on top of it.
    assert max(adapter.epsilon, gates.epsilon) < 8.0 < privacy.epsilon < 8.0 + 8.0
    assert privacy.delta == pytest.approx(3e-5)
    # Validation figures would be a release without DP: local only.
    assert meta.quality is None and report.quality is not None
    assert report.train is not None and report.train.dp_sgd is not None


def test_dp_sgd_refuses_causal_lm_experts(tiny_llama: Path, tmp_path: Path) -> None:
    texts, _ = toy_examples(20)
    config = TrainConfig(base_model=str(tiny_llama), task_type="causal_lm", epochs=1)
    with pytest.raises(ValueError, match="classification experts only"):
        train_expert(
            texts, None, config, tmp_path / "x", progress=False, dp_sgd=DPSGDConfig(epsilon=8.0)
        )


def test_the_cli_refuses_contradicting_privacy_options(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", *toy_examples(10))
    result = CliRunner().invoke(
        app,
        ["train", str(data), "--task-name", "t", "--no-dp", "--dp-epsilon", "1", "--offline"],
    )
    assert result.exit_code == 2 and "contradict" in result.output
