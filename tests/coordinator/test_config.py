"""Coordinator settings: precedence, coercion, refusals, and documentation of every key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from moerge.coordinator.config import CoordinatorConfig

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_flags_beat_environment_beat_file_beat_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "moerge.toml"
    toml.write_text(
        '[coordinator]\nlisten = "127.0.0.1:1111"\nmax_lora_rank = 8\nrouter_method = "lda"\n'
    )
    monkeypatch.setenv("MOERGE_MAX_LORA_RANK", "16")
    monkeypatch.setenv("MOERGE_TARGET_MODULES", "query, key,value")
    monkeypatch.setenv("MOERGE_AUTO_RETRAIN", "no")
    config = CoordinatorConfig.load(toml, router_method="qda", listen=None)
    assert config.listen == "127.0.0.1:1111"  # file (flag unset)
    assert config.max_lora_rank == 16  # env beats file
    assert config.router_method == "qda"  # flag beats file
    assert config.target_modules == ("query", "key", "value")
    assert config.auto_retrain is False
    assert config.database_url.startswith("sqlite:///")


def test_unknown_keys_and_bad_values_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text('lisen = "x"\n')
    with pytest.raises(ValueError, match="lisen"):
        CoordinatorConfig.load(toml)
    monkeypatch.setenv("MOERGE_MAX_LORA_RANK", "many")
    with pytest.raises(ValueError, match="max_lora_rank"):
        CoordinatorConfig.load()
    monkeypatch.delenv("MOERGE_MAX_LORA_RANK")
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        CoordinatorConfig.load(tls_cert="cert.pem")


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    for field in dataclasses.fields(CoordinatorConfig):
        assert f"`{field.name}`" in text, field.name
        assert f"`MOERGE_{field.name.upper()}`" in text, field.name


@pytest.mark.parametrize(
    ("method", "message"),
    [("centriod", "not a routing method"), ("oracle", "cannot serve"), ("base", "cannot serve")],
)
def test_a_router_method_that_cannot_serve_is_refused_at_start(method: str, message: str) -> None:
    """A typo once started the server and failed every scheduled fit in the log."""
    with pytest.raises(ValueError, match=f"router_method {method!r} .*{message}"):
        CoordinatorConfig.load(router_method=method)


def test_every_serving_router_method_is_accepted() -> None:
    from moerge.router_training.methods import available_methods

    for method in set(available_methods()) - {"oracle", "base"}:
        assert CoordinatorConfig.load(router_method=method).router_method == method
    assert CoordinatorConfig.load(router_method="base", task_type="causal_lm").task_type
