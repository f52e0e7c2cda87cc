"""LoraHub-style search of merge weights (router_training/composition.py), on plain functions."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest

from moerge.router_training.composition import (
    CompositionConfig,
    check_examples,
    cross_entropy,
    l1_penalty,
    search_weights,
)


def test_the_search_finds_the_minimum_of_a_known_loss_within_the_bounds() -> None:
    target = np.array([0.8, -0.3, 0.0, 0.5])
    result = search_weights(
        lambda w: float(((w - target) ** 2).sum()), 4, CompositionConfig(budget=150, l1=0.0)
    )
    assert np.allclose(result.weights, target, atol=0.05)
    assert result.evaluations == 150 and result.stopped_by == "budget"
    assert result.loss < result.start_loss


def test_the_first_point_is_the_uniform_merge_and_progress_follows_every_evaluation() -> None:
    seen, progress = [], []
    search_weights(
        lambda w: seen.append(w.copy()) or 1.0,
        3,
        CompositionConfig(budget=5),
        on_progress=progress.append,
    )
    assert np.allclose(seen[0], [1 / 3] * 3)
    assert [p.evaluations for p in progress] == [1, 2, 3, 4, 5]
    assert all(p.budget == 5 for p in progress)
    assert all(abs(w) <= 1.5 for point in seen for w in point)


def test_the_l1_penalty_prefers_the_sparser_of_two_equally_good_mixtures() -> None:
    # the loss only sees w0 + w1, so any split fits equally well; L1 picks a small total |w|
    def loss(w: np.ndarray) -> float:
        return float((w[0] + w[1] - 1.0) ** 2)

    result = search_weights(loss, 2, CompositionConfig(budget=200, l1=0.5))
    assert l1_penalty(np.array(result.weights), 1.0) <= 0.5 + 0.05
    assert min(result.weights) > -0.05


def test_a_search_stops_at_its_time_limit_and_when_cancelled() -> None:
    started = time.monotonic()
    slow = search_weights(
        lambda w: time.sleep(0.05) or 1.0, 2, CompositionConfig(budget=1000, time_limit_s=0.2)
    )
    assert slow.stopped_by == "time" and slow.evaluations < 20
    assert time.monotonic() - started < 2.0
    cancelled = search_weights(
        lambda w: 1.0, 2, CompositionConfig(budget=100), cancelled=lambda: True
    )
    assert cancelled.stopped_by == "cancelled" and cancelled.evaluations == 0


def test_the_same_seed_gives_the_same_weights() -> None:
    def loss(w: np.ndarray) -> float:
        return float(np.sin(3 * w).sum() + (w**2).sum())

    config = CompositionConfig(budget=30, seed=7)
    assert search_weights(loss, 3, config).weights == search_weights(loss, 3, config).weights


def test_a_non_finite_loss_counts_as_infinitely_bad() -> None:
    result = search_weights(
        lambda w: math.nan if w[0] > 0.6 else float((w[0] - 1) ** 2),
        2,
        CompositionConfig(budget=40, l1=0.0),
    )
    assert math.isfinite(result.loss) and result.weights[0] <= 0.6


def test_cross_entropy_is_the_mean_negative_log_probability_of_the_gold_label() -> None:
    labels = [("neg", "pos"), ("pos", "neg")]
    value = cross_entropy([[0.2, 0.8], [0.5, 0.5]], labels, ["pos", "pos"])
    assert value == pytest.approx(-(math.log(0.8) + math.log(0.5)) / 2)
    assert cross_entropy([[1.0]], [("a",)], ["b"]) == pytest.approx(-math.log(1e-12))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (CompositionConfig(budget=0), "budget"),
        (CompositionConfig(time_limit_s=0), "time_limit_s"),
        (CompositionConfig(l1=-1), "l1"),
        (CompositionConfig(bound=0), "bound"),
        (CompositionConfig(optimizer="adam"), "unknown optimizer"),
    ],
)
def test_invalid_settings_are_refused(config: CompositionConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_examples_must_be_one_to_a_hundred_non_empty_labelled_texts() -> None:
    check_examples(["a"], ["x"])
    for texts, labels in (
        [[], []],
        [["a"] * 101, ["x"] * 101],
        [["a"], [""]],
        [[" "], ["x"]],
        [["a", "b"], ["x"]],
    ):
        with pytest.raises(ValueError):
            check_examples(texts, labels)


def test_a_search_does_not_fill_the_log_with_cma_injection_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        search_weights(lambda w: float((w**2).sum()), 3, CompositionConfig(budget=20))
    assert not [w for w in caught if "injected solution" in str(w.message)]
