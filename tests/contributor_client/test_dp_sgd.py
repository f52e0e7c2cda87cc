"""DP-SGD for the adapter and the gates with Opacus: one noise multiplier for both
runs, accounted together with the statistics' release in the privacy report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from moerge.cli import app
from moerge.contributor_client.build import build_expert
from moerge.contributor_client.dp_sgd import (
    DPSGDConfig,
    adapter_steps,
    calibrate,
    private_head,
    private_prototypes,
    prototype_sums,
)
from moerge.contributor_client.gates import GateConfig
from moerge.contributor_client.privacy import composed_epsilon, dp_sgd_event
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.training import train_expert
from moerge.expert_format import ADAPTER_WEIGHTS, STATISTICS_META, StatisticsMeta

from .toy import toy_config, toy_examples, write_jsonl


def test_adapter_and_gates_add_the_same_noise_to_their_mean_gradient_within_the_budget() -> None:
    config = DPSGDConfig(
        epsilon=8.0, delta=1e-5, gate_steps=100, gate_examples=500, head_mechanism="sgd"
    )
    runs = config.runs(450, epochs=3)
    assert runs[0] == (*adapter_steps(config, 450, 3), 256) and runs[1] == (64 / 500, 100, 64)
    sigma = calibrate(config, runs)
    gate_sigma = config.gate_noise_multiplier
    assert gate_sigma is not None and sigma / 256 == pytest.approx(gate_sigma / 64)
    events = [dp_sgd_event(sigma, *runs[0][:2]), dp_sgd_event(gate_sigma, *runs[1][:2])]
    assert 0.97 * 8.0 <= composed_epsilon(events, 1e-5) <= 8.0 + 1e-6


def test_dp_sgd_expert_reports_every_release_and_keeps_quality_local(
    tiny_bert: Path, tmp_path: Path
) -> None:
    texts, labels = toy_examples(80)
    data = write_jsonl(tmp_path / "data.jsonl", texts, labels)
    dp_sgd = DPSGDConfig(
        epsilon=8.0, min_steps=6, batch_size=16, gate_batch_size=8, head_mechanism="sgd"
    )
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
    # the same noise on both runs' mean gradient (noise multiplier / expected batch)
    assert adapter.details["noise_multiplier"] / 16 == pytest.approx(
        gates.details["noise_multiplier"] / 8, rel=1e-3
    )
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


def test_default_prototype_head_and_gates_are_reported_as_one_step_and_a_run(
    tiny_bert: Path, tmp_path: Path
) -> None:
    texts, labels = toy_examples(80)
    data = write_jsonl(tmp_path / "data.jsonl", texts, labels)
    build_expert(
        data,
        tmp_path / "expert",
        "toy",
        toy_config(tiny_bert, epochs=1),
        gate_config=GateConfig(steps=4),
        dp_sgd=DPSGDConfig(epsilon=8.0, gate_batch_size=8),
        progress=False,
    )
    privacy = StatisticsMeta.read(tmp_path / "expert" / STATISTICS_META).privacy
    assert privacy is not None and privacy.all_dp
    adapter, gates = privacy.release("adapter"), privacy.release("gates")
    assert adapter.mechanism == gates.mechanism == "dp_sgd"
    assert (adapter.details["steps"], adapter.details["sample_rate"]) == (1, 1.0)
    assert adapter.details["library"] == "torch" and gates.details["library"] == "opacus"
    assert adapter.details["parameters"] == "head (prototypes)"
    assert adapter.details["noise_multiplier"] == gates.details["noise_multiplier"]
    assert max(adapter.epsilon, gates.epsilon) < 8.0 < privacy.epsilon < 8.0 + 8.0


SHARED = torch.tensor([1.0] + [0.25] * 15)  # along class 0's direction: an unfolded centre
# would make the head answer class 0 for everything


def _offset_blobs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated classes riding on a large shared component, as BERT's pooled
    features do (a shared vector of norm ~1.2, the classes ~0.4 apart around it)."""
    generator = torch.Generator().manual_seed(seed)
    shared = SHARED
    means = 0.3 * torch.eye(3, 16)
    labels = torch.arange(count) % 3
    noise = 0.03 * torch.randn(count, 16, generator=generator)
    return shared + means[labels] + noise, labels


def test_private_head_centres_its_features_and_still_reads_the_raw_ones() -> None:
    features, labels = _offset_blobs(600, seed=0)
    test_features, test_labels = _offset_blobs(300, seed=1)
    config = DPSGDConfig(epsilon=8.0)
    config.noise_multiplier = calibrate(config, [(256 / 600, 150, 256)])
    centre = SHARED  # what the empty text would give
    weight, bias, curve = private_head(features, labels, 3, centre, config, 150, 0.1)
    assert len(curve) == 150 and curve[-1] < curve[0]
    # The returned head has the centre folded into its bias: it reads raw features.
    predicted = (test_features @ weight.T + bias).argmax(-1)
    assert float((predicted == test_labels).float().mean()) > 0.9


def test_dp_sgd_noise_and_samples_come_from_the_os_unless_their_seed_is_fixed() -> None:
    features, labels = _offset_blobs(200, seed=0)

    def head(noise_seed: int | None) -> torch.Tensor:
        config = DPSGDConfig(
            epsilon=8.0, batch_size=64, head_mechanism="sgd", noise_seed=noise_seed
        )
        config.noise_multiplier = calibrate(config, [(64 / 200, 20, 64)])
        return private_head(features, labels, 3, SHARED, config, 20, 0.1)[0]

    assert not torch.equal(head(None), head(None))  # nothing a training seed would replay
    assert torch.equal(head(3), head(3))


def test_head_only_dp_sgd_runs_the_encoder_once_per_example_not_once_per_step(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from transformers import BertModel

    examples = 0

    def count(module: torch.nn.Module, _args: object, output: Any) -> None:
        nonlocal examples
        if isinstance(module, BertModel):
            examples += output.last_hidden_state.shape[0]

    texts, labels = toy_examples(60)
    dp_sgd = DPSGDConfig(epsilon=8.0, min_steps=200, batch_size=16, head_mechanism="sgd")
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        result = train_expert(
            texts, labels, toy_config(tiny_bert, epochs=1), tmp_path, False, dp_sgd
        )
    finally:
        handle.remove()
    assert result.dp_sgd is not None and result.dp_sgd.steps == 200
    # the probe, the head's features (+ the empty text) and the validation pass: a few
    # passes over the data, where one forward per step would be 200 x 16 examples
    assert examples <= 3 * len(texts) + 1


def test_prototype_head_is_one_gaussian_release_of_sensitivity_one_within_the_budget() -> None:
    import dp_accounting

    config = DPSGDConfig(epsilon=8.0, delta=1e-5)
    assert config.prototypes and adapter_steps(config, 450, 3) == (1.0, 1)
    sigma = calibrate(config, config.runs(450, epochs=3))
    # one full-batch step is the Gaussian mechanism itself
    gaussian = composed_epsilon([dp_accounting.GaussianDpEvent(sigma)], 1e-5)
    assert gaussian == pytest.approx(composed_epsilon([dp_sgd_event(sigma, 1.0, 1)], 1e-5))
    assert 0.97 * 8.0 <= gaussian <= 8.0 + 1e-6
    # adding or removing any one example moves the class sums by at most 1 (L2)
    features, labels = _offset_blobs(50, seed=2)
    features[7] = SHARED  # an example at the centre itself contributes nothing
    full = prototype_sums(features, labels, 3, SHARED)
    for i in range(len(features)):
        rest = torch.cat([features[:i], features[i + 1 :]])
        rest_labels = torch.cat([labels[:i], labels[i + 1 :]])
        moved = float((full - prototype_sums(rest, rest_labels, 3, SHARED)).norm())
        assert moved <= 1.0 + 1e-5


def test_prototype_head_and_gates_get_the_same_noise_multiplier_within_the_budget() -> None:
    config = DPSGDConfig(epsilon=8.0, delta=1e-5, gate_steps=100, gate_examples=500)
    runs = config.runs(450, epochs=3)
    assert runs == [(1.0, 1, 64), (64 / 500, 100, 64)]
    sigma = calibrate(config, runs)
    assert config.gate_noise_multiplier == pytest.approx(sigma)
    events = [dp_sgd_event(sigma, 1.0, 1), dp_sgd_event(sigma, 64 / 500, 100)]
    assert 0.97 * 8.0 <= composed_epsilon(events, 1e-5) <= 8.0 + 1e-6


def test_prototype_head_reads_the_raw_features_and_ranks_as_the_normalised_classifier() -> None:
    features, labels = _offset_blobs(600, seed=0)
    test_features, test_labels = _offset_blobs(300, seed=1)
    generator = torch.Generator().manual_seed(0)
    weight, bias = private_prototypes(features, labels, 3, SHARED, 0.6, 10.0, generator)
    assert weight.norm(dim=1) == pytest.approx(torch.full((3,), 10.0))
    raw = (test_features @ weight.T + bias).argmax(-1)
    centred = test_features - SHARED
    normalised = (centred / centred.norm(dim=1, keepdim=True)) @ weight.T
    assert torch.equal(raw, normalised.argmax(-1))
    assert float((raw == test_labels).float().mean()) > 0.9


def test_prototype_noise_is_drawn_afresh_unless_its_seed_is_fixed(
    tiny_bert: Path, tmp_path: Path
) -> None:
    texts, labels = toy_examples(40)
    heads = []
    for run, noise_seed in enumerate([None, None, 5, 5]):
        dp_sgd = DPSGDConfig(epsilon=8.0, noise_seed=noise_seed)
        result = train_expert(
            texts, labels, toy_config(tiny_bert, epochs=1), tmp_path / str(run), False, dp_sgd
        )
        account = result.dp_sgd
        assert account is not None and (account.steps, account.sample_rate) == (1, 1.0)
        assert account.parameters == "head (prototypes)" and account.library == "torch"
        heads.append(load_file(str(tmp_path / str(run) / ADAPTER_WEIGHTS)))
    key = "base_model.model.classifier.weight"
    # the same training seed: the noise must not be predictable from it
    assert not torch.equal(heads[0][key], heads[1][key])
    assert torch.equal(heads[2][key], heads[3][key])
    assert all(float(v.abs().max()) == 0.0 for k, v in heads[0].items() if "lora_B" in k)


def test_dp_sgd_refuses_an_unknown_head_mechanism() -> None:
    with pytest.raises(ValueError, match="head_mechanism"):
        DPSGDConfig(epsilon=8.0, head_mechanism="probe").validate()


def test_dp_sgd_with_train_lora_noises_the_lora_factors_too(
    tiny_bert: Path, tmp_path: Path
) -> None:
    texts, labels = toy_examples(40)
    dp_sgd = DPSGDConfig(epsilon=8.0, min_steps=3, batch_size=8, train_lora=True)
    result = train_expert(texts, labels, toy_config(tiny_bert, epochs=1), tmp_path, False, dp_sgd)
    assert result.dp_sgd is not None and result.dp_sgd.parameters == "head+lora"
    weights = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert any(float(v.abs().max()) > 0.0 for k, v in weights.items() if "lora_B" in k)


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
