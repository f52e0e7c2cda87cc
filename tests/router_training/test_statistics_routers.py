"""Statistics routers (LDA, QDA, MLP) and centroid retrieval, fitted from uploaded statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from moerge.router_training import (
    CentroidRouter,
    CentroidRouterConfig,
    ExpertRecord,
    ExpertStatistics,
    GaussianBank,
    LDARouter,
    LDARouterConfig,
    MLPRouter,
    MLPRouterConfig,
    QDARouter,
    QDARouterConfig,
)
from moerge.router_training.calibration import fit_temperature
from tests.router_training.helpers import HIDDEN, planted_experts, probe_inputs

H, RANK, COUNTS = 12, 2, (3000, 5000, 4000, 6000)


def true_gaussians(
    hidden: int = H, rank: int = RANK, spread: float = 0.35, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four overlapping Gaussians with rank-``rank`` + diagonal covariance: (mean, cov)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in COUNTS:
        mean = spread * torch.randn(hidden, generator=gen)
        factor = 0.5 * torch.randn(hidden, rank, generator=gen)
        diag = 0.1 + 0.2 * torch.rand(hidden, generator=gen)
        out.append((mean, factor @ factor.T + torch.diag(diag)))
    return out


def contributor_statistics(samples: torch.Tensor, rank: int) -> ExpertStatistics:
    """What a contributor uploads: mean, top-``rank`` eigen factor and diagonal residual."""
    samples = samples.double()
    mean = samples.mean(0)
    centred = samples - mean
    cov = centred.T @ centred / len(samples)
    evals, evecs = torch.linalg.eigh(cov)
    factor = evecs[:, -rank:] * evals[-rank:].sqrt()
    diag = torch.diagonal(cov - factor @ factor.T)
    return ExpertStatistics(
        example_count=len(samples),
        mean=mean.float(),
        cov_diag=diag.float(),
        cov_factor=factor.float(),
    )


def draw(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return MultivariateNormal(mean.double(), cov.double()).sample((n,)).float()


def sample_fitted_posteriors(
    samples: list[torch.Tensor], x: torch.Tensor, shared: bool
) -> torch.Tensor:
    """Textbook LDA / QDA fitted on the raw samples (full covariances): posteriors [n, E]."""
    counts = torch.tensor([len(s) for s in samples], dtype=torch.float64)
    means = [s.double().mean(0) for s in samples]
    covs = [torch.cov(s.double().T, correction=0) for s in samples]
    if shared:
        pooled = sum(n * c for n, c in zip(counts, covs, strict=True)) / counts.sum()
        covs = [pooled] * len(covs)
    log_joint = (
        torch.stack(
            [
                MultivariateNormal(m, c).log_prob(x.double())
                for m, c in zip(means, covs, strict=True)
            ],
            dim=1,
        )
        + (counts / counts.sum()).log()
    )
    return torch.softmax(log_joint, dim=1).float()


def compare_with_sample_fit(
    router_class: type, gaussians: list[tuple[torch.Tensor, torch.Tensor]], upload_rank: int
) -> tuple[float, float, float, float]:
    """(max |d posterior|, mean |d posterior|, argmax agreement, mean top reference posterior)."""
    samples = [
        draw(m, c, n, seed=i) for i, ((m, c), n) in enumerate(zip(gaussians, COUNTS, strict=True))
    ]
    records = [
        ExpertRecord(expert_id=f"e{i}", statistics=contributor_statistics(s, upload_rank))
        for i, s in enumerate(samples)
    ]
    router = router_class.fit(records, router_class.config_class(calibrate=False, top_k=4))
    x = torch.cat([draw(m, c, 250, seed=100 + i) for i, (m, c) in enumerate(gaussians)])
    ours = router.posteriors(x)
    reference = sample_fitted_posteriors(samples, x, shared=router_class is LDARouter)
    diff = (ours - reference).abs()
    agreement = (ours.argmax(1) == reference.argmax(1)).float().mean()
    confidence = reference.max(1).values.mean()
    return float(diff.max()), float(diff.mean()), float(agreement), float(confidence)


@pytest.mark.parametrize("router_class", [LDARouter, QDARouter])
def test_router_from_lossless_statistics_matches_router_fitted_on_the_samples(
    router_class,
) -> None:
    """Upload rank = H: the statistics hold the whole sample covariance. Tolerance: posteriors
    within 0.01 (the relative variance floor of 1e-3 perturbs Sigma slightly), argmax agreeing
    on >= 99.5% of 1,000 points drawn from the four overlapping Gaussians."""
    max_diff, _, agreement, confidence = compare_with_sample_fit(router_class, true_gaussians(), H)
    assert max_diff < 0.01
    assert agreement >= 0.995
    assert confidence < 0.99  # posteriors are informative, not all saturated at 0 / 1


@pytest.mark.parametrize("router_class", [LDARouter, QDARouter])
def test_router_from_compressed_statistics_matches_router_fitted_on_the_samples(
    router_class,
) -> None:
    """H = 48, true rank 4 + diagonal, contributors upload rank 8 + diagonal residual.

    The compression itself is lossy: ``diag(S - U U^T)`` keeps every per-dimension variance but
    not the variance along the discarded eigen-directions, so posteriors differ from the
    sample-fitted ones beyond sampling noise (measured: LDA mean 0.017 / max 0.21 / 97.7%
    argmax agreement; QDA mean 4e-5). Tolerance: mean |d posterior| < 0.03, argmax agreement
    >= 95%.
    """
    gaussians = true_gaussians(hidden=48, rank=4, spread=0.15)
    _, mean_diff, agreement, _ = compare_with_sample_fit(router_class, gaussians, upload_rank=8)
    assert mean_diff < 0.03
    assert agreement >= 0.95


@pytest.fixture(scope="module")
def records() -> list[ExpertRecord]:
    """Statistics as uploaded for the four Gaussians of :func:`true_gaussians` (rank 2)."""
    return [
        ExpertRecord(expert_id=f"e{i}", statistics=contributor_statistics(draw(m, c, n, i), RANK))
        for i, ((m, c), n) in enumerate(zip(true_gaussians(), COUNTS, strict=True))
    ]


def test_qda_log_joint_equals_low_rank_gaussian_log_density(records) -> None:
    router = QDARouter.fit(records, QDARouterConfig(calibrate=False, priors="counts"))
    bank = GaussianBank.from_experts(records)
    x = torch.randn(40, H) * 0.6
    log_prior = bank.prior_probs("counts").log()
    expected = torch.stack(
        [
            LowRankMultivariateNormal(
                bank.means[e].double(), bank.cov_factor[e].double(), bank.cov_diag[e].double()
            ).log_prob(x.double())
            + log_prior[e]
            for e in range(bank.num_experts)
        ],
        dim=1,
    )
    ours = router.logits(x).double()
    # Logits are log joints up to a constant per row: compare differences to expert 0.
    torch.testing.assert_close(ours - ours[:, :1], expected - expected[:, :1], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("solver", ["woodbury", "dense"])
@pytest.mark.parametrize("shrinkage", [0.0, 0.3])
def test_lda_discriminant_equals_dense_shared_gaussian(
    records, solver: str, shrinkage: float
) -> None:
    router = LDARouter.fit(
        records, LDARouterConfig(calibrate=False, solver=solver, shrinkage=shrinkage)
    )
    bank = GaussianBank.from_experts(records)
    w = bank.counts / bank.counts.sum()
    covs = [
        bank.cov_factor[e].double() @ bank.cov_factor[e].double().T
        + torch.diag(bank.cov_diag[e].double())
        for e in range(bank.num_experts)
    ]
    pooled = sum(w[e] * covs[e] for e in range(bank.num_experts))
    pooled = (1 - shrinkage) * pooled + shrinkage * torch.trace(pooled) / H * torch.eye(
        H, dtype=torch.float64
    )
    x = torch.randn(40, H) * 0.6
    expected = torch.stack(
        [
            MultivariateNormal(bank.means[e].double(), pooled).log_prob(x.double()) + w[e].log()
            for e in range(bank.num_experts)
        ],
        dim=1,
    )
    ours = router.logits(x).double()
    torch.testing.assert_close(ours - ours[:, :1], expected - expected[:, :1], atol=2e-3, rtol=1e-4)


def twin_experts(counts: tuple[int, int]) -> list[ExpertRecord]:
    stats = planted_experts(1)[0].statistics
    assert stats is not None
    return [
        ExpertRecord(
            expert_id=f"twin-{i}",
            statistics=ExpertStatistics(
                example_count=n,
                mean=stats.mean,
                cov_diag=stats.cov_diag,
                cov_factor=stats.cov_factor,
            ),
        )
        for i, n in enumerate(counts)
    ]


@pytest.mark.parametrize("router_class", [LDARouter, QDARouter])
def test_priors_follow_example_counts_or_are_uniform(router_class) -> None:
    """Two experts with identical Gaussians: the posterior is the prior itself."""
    x, _ = probe_inputs()
    for priors, expected in (("counts", [0.25, 0.75]), ("uniform", [0.5, 0.5])):
        router = router_class.fit(
            twin_experts((100, 300)), router_class.config_class(priors=priors, calibrate=False)
        )
        torch.testing.assert_close(
            router.posteriors(x), torch.tensor([expected]).expand(len(x), 2), atol=1e-5, rtol=0
        )


def test_mlp_adds_log_priors_to_a_class_balanced_classifier() -> None:
    experts = planted_experts()
    common = {"hidden_sizes": [16], "steps": 30, "batch_size": 64, "calibrate": False}
    by_count = MLPRouter.fit(experts, MLPRouterConfig(priors="counts", **common))
    uniform = MLPRouter.fit(experts, MLPRouterConfig(priors="uniform", **common))
    x, _ = probe_inputs()
    counts = torch.tensor([e.statistics.example_count for e in experts], dtype=torch.float64)
    shift = ((counts / counts.sum()).log() - math.log(1 / len(experts))).float()
    torch.testing.assert_close(by_count.logits(x) - uniform.logits(x), shift.expand(len(x), -1))


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20000, 6, generator=gen)
    labels = torch.multinomial(torch.softmax(logits / 2.5, dim=1), 1, generator=gen).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_calibration_lowers_held_out_nll_of_an_under_trained_mlp() -> None:
    """An MLP's logits have no probabilistic scale; T fitted on Gaussian draws repairs it."""
    experts = planted_experts()
    common = {"hidden_sizes": [32], "steps": 40, "batch_size": 128, "lda_skip": False}
    raw = MLPRouter.fit(experts, MLPRouterConfig(calibrate=False, **common))
    calibrated = MLPRouter.fit(experts, MLPRouterConfig(calibrate=True, **common))
    assert calibrated.temperature != pytest.approx(1.0, abs=0.05)
    bank = GaussianBank.from_experts(experts)
    x, y = bank.draw_labelled(4000, bank.prior_probs("counts"), torch.Generator().manual_seed(9))
    x = calibrated.prepare_samples(x)

    def nll(router: MLPRouter) -> float:
        return float(-router.posteriors(x).gather(1, y[:, None]).log().mean())

    assert nll(calibrated) < nll(raw)


def test_perfectly_separated_samples_do_not_drive_the_temperature_to_zero() -> None:
    logits = torch.tensor([[20.0, 0.0, 0.0], [0.0, 25.0, 0.0], [0.0, 0.0, 30.0]]).repeat(50, 1)
    labels = torch.tensor([0, 1, 2]).repeat(50)
    temperature = fit_temperature(logits, labels)
    top = torch.softmax(logits / temperature, dim=1).max(1).values
    assert temperature > 1.0  # the raw margins are overconfident for a 1e-3 smoothed target
    assert 0.99 < float(top.min()) < 0.9999


def test_centroid_weights_follow_cosine_similarity_with_temperature() -> None:
    experts = planted_experts()
    router = CentroidRouter.fit(experts, CentroidRouterConfig(top_k=3, temperature=0.2))
    x, _ = probe_inputs()
    means = torch.stack([e.statistics.mean for e in experts])
    cos = torch.nn.functional.cosine_similarity(x[:, None, :], means[None], dim=-1)
    values, indices = cos.topk(3, dim=1)
    decision = router.route_examples(10 * x)  # scale-invariant
    assert torch.equal(decision.indices, indices)
    torch.testing.assert_close(decision.weights, torch.softmax(values / 0.2, dim=1))


def test_centroid_calibration_fits_a_temperature_from_the_gaussians() -> None:
    router = CentroidRouter.fit(planted_experts(), CentroidRouterConfig(calibrate=True))
    assert router.temperature != 0.1
    assert 0.01 <= router.temperature <= 100


@pytest.mark.parametrize("router_class", [LDARouter, CentroidRouter])
def test_bfloat16_scores_route_like_float32(router_class) -> None:
    experts = planted_experts()
    fast = router_class.fit(experts, router_class.config_class(top_k=2, score_dtype="bfloat16"))
    exact = router_class.fit(experts, router_class.config_class(top_k=2))
    x, _ = probe_inputs()
    a, b = fast.route_examples(x), exact.route_examples(x)
    assert torch.equal(a.indices[:, 0], b.indices[:, 0])
    torch.testing.assert_close(a.weights, b.weights, atol=0.02, rtol=0)


def test_experts_without_statistics_or_with_mismatched_sizes_are_named() -> None:
    experts = planted_experts(3)
    experts[1].statistics = None
    with pytest.raises(ValueError, match="expert-1"):
        LDARouter.fit(experts, LDARouterConfig())
    experts = planted_experts(3)
    assert experts[2].statistics is not None
    experts[2].statistics.mean = torch.zeros(HIDDEN + 1)
    with pytest.raises(ValueError, match="expert-2"):
        QDARouter.fit(experts, QDARouterConfig())


def test_rank_zero_statistics_are_supported() -> None:
    experts = planted_experts()
    for e in experts:
        assert e.statistics is not None
        e.statistics.cov_factor = torch.zeros(HIDDEN, 0)
    x, labels = probe_inputs()
    for cls in (LDARouter, QDARouter, MLPRouter):
        params = {"steps": 40, "batch_size": 64} if cls is MLPRouter else {}
        router = cls.fit(experts, cls.config_class(**params))
        assert torch.equal(router.route_examples(x).indices[:, 0], labels)


def test_mlp_with_lda_skip_starts_from_the_lda_discriminant(records) -> None:
    lda = LDARouter.fit(records, LDARouterConfig(priors="uniform", calibrate=False))
    mlp = MLPRouter.fit(
        records,
        MLPRouterConfig(
            priors="uniform",
            calibrate=False,
            steps=1,
            learning_rate=1e-9,
            hidden_sizes=[8],
            normalize_samples=False,
        ),
    )
    x = torch.randn(30, H) * 0.6
    a, b = lda.logits(x).double(), mlp.logits(x).double()
    torch.testing.assert_close(a - a[:, :1], b - b[:, :1], atol=1e-3, rtol=1e-4)
