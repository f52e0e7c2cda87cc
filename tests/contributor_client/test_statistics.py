"""Summary statistics: exact moments, low-rank + diagonal covariance, privacy, the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from moerge.contributor_client.batching import load_tokenizer
from moerge.contributor_client.privacy import (
    MIN_EXAMPLES_WITHOUT_DP,
    NOISE_RATIOS,
    DPConfig,
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    clip_rows,
    gaussian_delta,
    noise_stds,
)
from moerge.contributor_client.statistics import (
    COV_DIAG_FLOOR,
    TooFewExamples,
    compute_statistics,
    load_statistics,
    low_rank_plus_diag,
    mean_and_covariance,
    save_statistics,
    summarize_embeddings,
)
from moerge.embedding import pooled_embeddings
from moerge.expert_format import (
    COV_DIAG_KEY,
    COV_FACTOR_KEY,
    MEAN_KEY,
    STATISTICS_META,
    STATISTICS_TENSORS,
    StatisticsMeta,
)

from .toy import toy_examples


def unit_rows(count: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Random unit-norm rows with a non-zero mean and correlated coordinates."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    x = torch.randn(count, dim, generator=generator, dtype=torch.float64) @ mixing + 2.0
    return torch.nn.functional.normalize(x, dim=1)


def test_mean_and_covariance_equal_torch() -> None:
    x = unit_rows(50, 8)
    mean, cov = mean_and_covariance(len(x), x.sum(dim=0), x.T @ x)
    torch.testing.assert_close(mean, x.mean(dim=0), atol=1e-12, rtol=0)
    torch.testing.assert_close(cov, torch.cov(x.T), atol=1e-12, rtol=0)


def test_full_rank_summary_reconstructs_the_covariance() -> None:
    x = unit_rows(50, 8)
    summary = summarize_embeddings(x, [0] * 20 + [1] * 30, num_labels=2, rank=8)
    assert (summary.count, summary.label_counts) == (50, [20, 30])
    torch.testing.assert_close(summary.mean, x.mean(dim=0), atol=1e-12, rtol=0)
    approx = summary.cov_factor @ summary.cov_factor.T + torch.diag(summary.cov_diag)
    torch.testing.assert_close(approx, torch.cov(x.T), atol=2 * COV_DIAG_FLOOR, rtol=0)
    assert summary.noise_std == {}


def test_low_rank_error_is_bounded_by_the_discarded_eigenvalues() -> None:
    cov = torch.cov(unit_rows(200, 24).T)
    eigenvalues = torch.linalg.eigvalsh(cov).flip(0)
    for rank in (0, 4, 12):
        factor, diag = low_rank_plus_diag(cov, rank)
        assert factor.shape == (24, rank) and diag.shape == (24,)
        error = cov - factor @ factor.T - torch.diag(diag)
        off_diagonal = error - torch.diag(torch.diagonal(error))
        bound = eigenvalues[rank:].pow(2).sum().sqrt()
        assert off_diagonal.norm() <= bound + 1e-12
        # On the diagonal the approximation is exact, up to the floor.
        assert torch.diagonal(error).abs().max() <= COV_DIAG_FLOOR
        assert diag.min() >= COV_DIAG_FLOOR


def test_low_rank_factor_is_deterministic_in_sign() -> None:
    cov = torch.cov(unit_rows(100, 10).T)
    factor, _ = low_rank_plus_diag(cov, 3)
    pivots = factor.abs().argmax(dim=0)
    assert (factor[pivots, torch.arange(3)] > 0).all()


def test_compute_statistics_summarises_base_model_embeddings(tiny_bert: Path) -> None:
    texts, labels = toy_examples(60)  # without DP, at least MIN_EXAMPLES_WITHOUT_DP
    gates = {"encoder.layer.0.attention.self.query": torch.ones(32)}
    tensors, meta = compute_statistics(
        tiny_bert,
        texts,
        labels,
        ["finance", "sport"],
        "toy",
        "sport or money",
        rank=4,
        gates=gates,
        base_model_id="tiny-bert",
    )
    model = AutoModel.from_pretrained(tiny_bert)
    embeddings = pooled_embeddings(model, load_tokenizer(str(tiny_bert)), texts)
    torch.testing.assert_close(tensors[MEAN_KEY], embeddings.mean(dim=0), atol=1e-6, rtol=0)
    assert tensors[COV_FACTOR_KEY].shape == (32, 4)
    assert tensors[COV_DIAG_KEY].shape == (32,)
    assert tensors["gates.encoder.layer.0.attention.self.query"].shape == (32,)
    assert meta.example_count == 60 and meta.label_counts == [30, 30]
    assert (meta.hidden_size, meta.covariance_rank) == (32, 4)
    assert meta.gate_modules == list(gates)
    assert (meta.task_name, meta.task_description, meta.base_model_id) == (
        "toy",
        "sport or money",
        "tiny-bert",
    )
    assert meta.dp is None
    assert meta.privacy is not None and meta.privacy.statistics_opt_out
    assert meta.privacy.release("statistics").mechanism == "none"


def test_saved_statistics_hold_no_per_example_data(tiny_bert: Path, tmp_path: Path) -> None:
    sizes = []
    for count in (50, 80):
        texts, labels = toy_examples(count, seed=count)
        tensors, meta = compute_statistics(tiny_bert, texts, labels, ["finance", "sport"], "t")
        save_statistics(tmp_path / str(count), tensors, meta)
        files = [tmp_path / str(count) / name for name in (STATISTICS_TENSORS, STATISTICS_META)]
        sizes.append([f.stat().st_size for f in files])
        content = b"".join(f.read_bytes() for f in files)
        assert not any(text.encode() in content for text in texts)
    assert sizes[0] == sizes[1]


def test_statistics_round_trip_through_the_files(tiny_bert: Path, tmp_path: Path) -> None:
    texts, labels = toy_examples(12)
    dp = DPConfig(epsilon=2.0, delta=1e-5, seed=0)
    tensors, meta = compute_statistics(tiny_bert, texts, labels, ["finance", "sport"], "t", dp=dp)
    save_statistics(tmp_path, tensors, meta)
    loaded_tensors, loaded_meta = load_statistics(tmp_path)
    assert loaded_meta == meta
    assert loaded_meta.dp is not None and loaded_meta.dp.noise_std == meta.dp.noise_std
    assert StatisticsMeta.from_dict(json.loads(meta.to_json())) == meta
    assert sorted(loaded_tensors) == sorted(tensors)
    assert all(torch.equal(loaded_tensors[k], tensors[k]) for k in tensors)


def test_save_statistics_rejects_tensors_that_disagree_with_the_meta(
    tiny_bert: Path, tmp_path: Path
) -> None:
    dp = DPConfig(epsilon=1.0, delta=1e-5, seed=0)
    tensors, meta = compute_statistics(tiny_bert, ["good film"], None, [], "t", rank=2, dp=dp)
    with pytest.raises(ValueError, match=r"embedding\.cov_factor"):
        save_statistics(tmp_path, {**tensors, COV_FACTOR_KEY: torch.zeros(32, 3)}, meta)
    with pytest.raises(ValueError, match="gate tensors"):
        save_statistics(tmp_path, {**tensors, "gates.encoder.x": torch.zeros(32)}, meta)


def test_single_example_has_zero_covariance_and_floor_diagonal() -> None:
    summary = summarize_embeddings(unit_rows(1, 8), rank=2)
    assert summary.count == 1 and summary.label_counts == [1]
    assert torch.all(summary.cov_factor == 0)
    assert torch.all(summary.cov_diag == COV_DIAG_FLOOR)


def test_statistics_without_dp_of_too_few_examples_are_refused(tiny_bert: Path) -> None:
    texts, labels = toy_examples(MIN_EXAMPLES_WITHOUT_DP - 1)
    with pytest.raises(TooFewExamples, match=f"at least {MIN_EXAMPLES_WITHOUT_DP} examples"):
        compute_statistics(tiny_bert, texts, labels, ["finance", "sport"], "t")
    with pytest.raises(TooFewExamples):  # the mean of one text is that text's embedding
        compute_statistics(tiny_bert, ["good film"], None, [], "t", task_type="causal_lm")
    # Under DP the noise protects any count: a single example is released, noised.
    dp = DPConfig(epsilon=1.0, delta=1e-5, seed=0)
    _, meta = compute_statistics(
        tiny_bert, ["good film"], None, [], "t", dp=dp, task_type="causal_lm"
    )
    assert meta.dp is not None and not meta.privacy.statistics_opt_out


def test_analytic_sigma_is_private_and_no_larger_than_the_classic_one() -> None:
    for epsilon, delta in ((0.1, 1e-6), (0.5, 1e-5), (0.9, 1e-3)):
        sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity=2.0)
        assert gaussian_delta(sigma, epsilon, 2.0) <= delta
        assert gaussian_delta(sigma * 0.99, epsilon, 2.0) > delta  # and it is the smallest
        assert sigma <= classic_gaussian_sigma(epsilon, delta, 2.0)
    # Valid beyond epsilon = 1, where the classic formula does not apply.
    assert gaussian_delta(analytic_gaussian_sigma(8.0, 1e-5, 1.0), 8.0, 1.0) <= 1e-5


def test_clipping_bounds_row_norms() -> None:
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    torch.testing.assert_close(clip_rows(x, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_dp_noise_matches_the_recorded_noise_std() -> None:
    x = unit_rows(400, 16)
    label_ids = [0] * 100 + [1] * 300
    config = DPConfig(epsilon=1.0, delta=1e-5)
    stds = noise_stds(config)
    mean_errors, count_errors = [], []
    for seed in range(200):
        config.seed = seed
        summary = summarize_embeddings(x, label_ids, num_labels=2, rank=4, dp=config)
        mean_errors.append(summary.mean - x.mean(dim=0))
        count_errors.append(float(summary.count - 400))
        # The mean's std is the sum's over the (noisy) count it was divided by.
        expected = {**stds, "mean": stds["sum"] / summary.count}
        assert summary.noise_std == pytest.approx(expected, rel=0.01)
    empirical_mean_std = torch.stack(mean_errors).std().item()
    assert 0.8 < empirical_mean_std / (stds["sum"] / 400) < 1.25
    # The count is its own release, not the sum of the noisy label counts.
    empirical_count_std = torch.tensor(count_errors).std().item()
    assert 0.8 < empirical_count_std / stds["count"] < 1.25


def test_dp_covariance_is_positive_semi_definite_and_meta_records_the_budget(
    tiny_bert: Path,
) -> None:
    texts, labels = toy_examples(40)
    dp = DPConfig(epsilon=0.5, delta=1e-6, clip_norm=0.5, seed=1)
    tensors, meta = compute_statistics(
        tiny_bert, texts, labels, ["finance", "sport"], "t", rank=32, dp=dp
    )
    factor, diag = tensors[COV_FACTOR_KEY], tensors[COV_DIAG_KEY]
    assert torch.linalg.eigvalsh((factor @ factor.T + torch.diag(diag)).double()).min() > 0
    assert meta.dp is not None
    assert (meta.dp.epsilon, meta.dp.delta, meta.dp.clip_norm) == (0.5, 1e-6, 0.5)
    assert meta.dp.mechanism == "gaussian_pld"
    expected = noise_stds(dp)
    for name in ("count", "label_counts", "sum", "second_moment"):
        assert meta.dp.noise_std[name] == expected[name]
    # Each std is the release's sensitivity (1, 1, C, C^2) times its multiplier.
    ratio = {name: expected[name] / NOISE_RATIOS[name] for name in NOISE_RATIOS}
    assert ratio["label_counts"] == pytest.approx(ratio["count"])
    assert ratio["sum"] == pytest.approx(0.5 * ratio["count"])
    assert ratio["second_moment"] == pytest.approx(0.25 * ratio["count"])
    assert all(count >= 0 for count in meta.label_counts)


def test_dp_without_a_seed_draws_fresh_noise() -> None:
    x = unit_rows(100, 8)
    config = DPConfig(epsilon=1.0, delta=1e-5)
    first = summarize_embeddings(x, dp=config)
    second = summarize_embeddings(x, dp=config)
    assert not torch.equal(first.mean, second.mean)
