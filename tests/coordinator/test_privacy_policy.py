"""The coordinator's privacy policy: a minimum count without DP, a maximum epsilon,
DP-SGD required, and the privacy report recorded and shown to contributors and admins."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest

from moerge.client import Client
from moerge.contributor_client.connection import Target
from moerge.contributor_client.privacy import DPConfig, SGDAccount, privacy_report
from moerge.contributor_client.upload import upload_expert
from moerge.coordinator.uploads.base_model import describe_base_model
from moerge.coordinator.uploads.privacy_policy import PrivacyPolicy, privacy_refusal
from moerge.coordinator.uploads.validation import ExpertInvalid, validate_expert_dir
from moerge.expert_format import STATISTICS_META, StatisticsMeta
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir, rewrite_json

DP = {
    "epsilon": 4.0,
    "delta": 1e-5,
    "clip_norm": 1.0,
    "noise_std": {"sum": 1.9},
    "mechanism": "gaussian_pld",
}
SGD = SGDAccount(
    noise_multiplier=1.1, sample_rate=0.1, steps=100, max_grad_norm=1.0, epsilon=6.0, delta=1e-5
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    return make_expert_dir(tiny_bert, tmp_path_factory.mktemp("experts") / "template")


def _expert(template: Path, tmp_path: Path, **meta: object) -> Path:
    folder = tmp_path / "expert"
    shutil.copytree(template, folder, ignore=shutil.ignore_patterns("README.md"))
    rewrite_json(folder / STATISTICS_META, **meta)
    return folder


def _report(dp: DPConfig | None, adapter: object = "none", opt_out: bool = False) -> dict:
    return asdict(privacy_report(dp, opt_out=opt_out, adapter=adapter))


def test_policy_refusals_name_the_rule() -> None:
    def meta(count: int, dp: dict | None, report: dict | None) -> StatisticsMeta:
        return StatisticsMeta.from_dict(
            {
                "example_count": count,
                "hidden_size": 4,
                "covariance_rank": 0,
                "task_name": "t",
                "dp": dp,
                "privacy": report,
            }
        )

    default = PrivacyPolicy()
    plain = _report(None, opt_out=True)
    assert "at least 50" in privacy_refusal(meta(49, None, plain), default)
    assert "at least 50" in privacy_refusal(meta(1, None, None), default)  # before privacy reports
    assert privacy_refusal(meta(50, None, plain), default) == ""
    assert privacy_refusal(meta(1, DP, _report(DPConfig(4.0, 1e-5))), default) == ""
    strict = PrivacyPolicy(max_epsilon=2.0)
    assert "requires DP statistics" in privacy_refusal(meta(500, None, plain), strict)
    assert "statistics: epsilon 4 exceeds" in privacy_refusal(
        meta(500, DP, _report(DPConfig(4.0, 1e-5))), strict
    )
    loose = PrivacyPolicy(max_epsilon=6.5)
    assert privacy_refusal(meta(500, DP, _report(DPConfig(4.0, 1e-5))), loose) == ""
    # Each part within 6.5 (4 and 6) but everything together above it: the composition counts
    # (7.1 by the PLD accountant, less than the 10 of adding the epsilons).
    both = _report(DPConfig(4.0, 1e-5), adapter=SGD)
    assert 6.5 < both["epsilon"] < 10.0
    assert "everything released" in privacy_refusal(meta(500, DP, both), loose)
    training = PrivacyPolicy(require_dp_training=True)
    assert "requires DP-SGD" in privacy_refusal(
        meta(500, DP, _report(DPConfig(4.0, 1e-5))), training
    )
    assert privacy_refusal(meta(500, DP, both), training) == ""
    # A report claiming DP statistics while the 'dp' record says none is refused.
    assert "disagree" in privacy_refusal(meta(500, None, _report(DPConfig(4.0, 1e-5))), default)


def test_validation_refuses_a_small_release_without_dp(
    template: Path, tmp_path: Path, tiny_bert: Path
) -> None:
    spec = describe_base_model(tiny_bert, "tiny-bert", "classification", ("query", "value"), 8)
    folder = _expert(template, tmp_path, example_count=12)
    with pytest.raises(ExpertInvalid, match="without differential privacy of 12 examples"):
        validate_expert_dir(folder, spec, 1 << 30)
    rewrite_json(folder / STATISTICS_META, dp=DP, privacy=_report(DPConfig(4.0, 1e-5)))
    assert validate_expert_dir(folder, spec, 1 << 30).example_count == 12


def _target(coordinator: BackgroundCoordinator, name: str = "alice") -> Target:
    _, credential = enroll(coordinator.address, coordinator.admin_token(), name)
    return Target(address=coordinator.address, token=credential)


def test_the_report_is_recorded_and_shown_and_the_opt_out_too(
    coordinator: BackgroundCoordinator, template: Path, tmp_path: Path
) -> None:
    target = _target(coordinator)
    private = _expert(template, tmp_path / "a", dp=DP, privacy=_report(DPConfig(4.0, 1e-5)))
    opted_out = _expert(
        template,
        tmp_path / "b",
        example_count=80,
        task_name="other",
        privacy=_report(None, opt_out=True),
    )
    upload_expert(target, private, "private", "toy", progress=False)
    upload_expert(target, opted_out, "plain", "other", progress=False)
    with Client(target.address, token=target.token) as client:
        mine = {e.name: e for e in client.my_experts()}
    report = mine["private"].privacy_report
    assert report is not None and not report.statistics_opt_out
    assert [(r.what, r.mechanism, r.epsilon) for r in report.releases] == [
        ("statistics", "gaussian_pld", 4.0),
        ("adapter", "none", None),
    ]
    assert report.summary() == "statistics eps 4; adapter not DP"
    plain = mine["plain"].privacy_report
    assert plain.statistics_opt_out and plain.epsilon is None
    assert plain.summary().startswith("statistics NOT DP (opted out)")
    with Client(coordinator.address, token=coordinator.admin_token()) as admin:
        shown = admin.get_expert(mine["plain"].expert_id)
    assert shown.privacy_report == plain


def test_a_coordinator_with_a_maximum_epsilon_refuses_what_exceeds_it(
    tmp_path: Path, tiny_bert: Path, template: Path
) -> None:
    config = coordinator_config(tmp_path / "data", tiny_bert, max_epsilon=2.0)
    with BackgroundCoordinator(config) as coordinator:
        target = _target(coordinator)
        for name, meta in (
            ("plain", {"privacy": _report(None, opt_out=True)}),
            ("loose", {"dp": DP, "privacy": _report(DPConfig(4.0, 1e-5))}),
        ):
            folder = _expert(template, tmp_path / name, **meta)
            with pytest.raises(grpc.RpcError) as err:
                upload_expert(target, folder, name, "toy", progress=False)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "epsilon" in err.value.details() or "max_epsilon" in err.value.details()
        tight = {**DP, "epsilon": 1.5}
        folder = _expert(
            template, tmp_path / "tight", dp=tight, privacy=_report(DPConfig(1.5, 1e-5))
        )
        assert upload_expert(target, folder, "tight", "toy", progress=False).created
