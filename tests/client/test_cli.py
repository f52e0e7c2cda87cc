"""The ``moerge`` CLI as a thin layer over moerge.Client: ids, JSON, hints, inputs, tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moerge
from moerge.cli import app
from moerge.cli.admin import ROUTER_METHODS
from moerge.client import unique_prefix
from tests.coordinator.harness import BackgroundCoordinator
from tests.experts import make_expert_dir


def _invoke(*args: str, input: str | None = None) -> object:
    return CliRunner().invoke(app, list(args), input=input)


@pytest.fixture
def served(running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path) -> dict[str, object]:
    """Two experts uploaded by contributor "lab"; returns the ids and the admin's options."""
    admin = ["-c", running.address, "--token", running.admin_token()]
    with moerge.Client(running.address, token=running.admin_token()) as api:
        invite = api.create_enrollment_token().token
    with moerge.Client(running.address) as lab:
        lab.join(invite, "lab")
        ids = [
            lab.upload(
                make_expert_dir(tiny_bert, tmp_path / f"e{i}", labels=labels, task_name=f"t{i}"),
                f"expert{i}",
            ).expert.expert_id
            for i, labels in enumerate((("neg", "pos"), ("sport", "tech", "money")))
        ]
    return {"ids": ids, "admin": admin}


def test_id_prefixes_resolve_like_git_and_ambiguity_names_the_candidates() -> None:
    ids = ["abc123" + "0" * 26, "abd456" + "0" * 26, "ffff00" + "0" * 26]
    assert unique_prefix("expert", "abc", ids) == ids[0]
    assert unique_prefix("expert", "FF", ids) == ids[2]
    ambiguous = r"ambiguous: 2 match \(abc123000000, abd456000000\)"
    with pytest.raises(moerge.MoergeError, match=ambiguous):
        unique_prefix("expert", "ab", ids)
    with pytest.raises(moerge.MoergeError, match="no expert id starts with 'abe'"):
        unique_prefix("expert", "abe", ids)


def test_admin_commands_take_a_unique_prefix_of_an_id(served: dict) -> None:
    expert_id = served["ids"][0]
    shown = _invoke("admin", "experts", "show", expert_id[:8], *served["admin"], "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["expert_id"] == expert_id
    missing = _invoke("admin", "experts", "show", "zzzz", *served["admin"])
    assert missing.exit_code == 1 and "NOT_FOUND: no expert id starts with 'zzzz'" in missing.stderr
    listed = json.loads(_invoke("admin", "contributors", "list", *served["admin"], "--json").stdout)
    contributor_id = listed["contributors"][0]["contributor_id"]
    by_owner = _invoke(
        "admin", "experts", "list", "--contributor", contributor_id[:6], *served["admin"], "--json"
    )
    assert {e["expert_id"] for e in json.loads(by_owner.stdout)["experts"]} == set(served["ids"])
    revoked = _invoke("admin", "contributors", "revoke", contributor_id[:6], *served["admin"])
    assert revoked.exit_code == 0 and f"revoked {contributor_id} (lab)" in revoked.stdout


def test_json_has_numbers_as_numbers_and_enums_as_the_clis_words(served: dict) -> None:
    expert_id = served["ids"][1]
    changed = _invoke(
        "admin", "experts", "set-state", expert_id[:10], "quarantined", *served["admin"], "--json"
    )
    assert changed.exit_code == 0, changed.output
    expert = json.loads(changed.stdout)
    assert expert["state"] == "quarantined" and isinstance(expert["example_count"], int)
    trained = _invoke("admin", "router", "train", "--method", "lda", *served["admin"], "--json")
    version = json.loads(trained.stdout)
    assert isinstance(version["version"], int) and version["active"] is True
    routed = json.loads(_invoke("route", "hello", *served["admin"], "--json").stdout)
    assert routed["router_version"] == version["version"]
    assert isinstance(routed["decisions"][0][0]["weight"], float)


def test_an_unreachable_coordinator_gets_a_hint() -> None:
    result = _invoke("admin", "experts", "list", "-c", "127.0.0.1:1", "--token", "x")
    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.stderr
    assert "hint: is a coordinator listening at 127.0.0.1:1?" in result.stderr


def test_predict_and_route_read_jsonl_or_lines_from_a_file_or_stdin(
    served: dict, tmp_path: Path
) -> None:
    texts = ["the film was great", "two lines:\nstocks fell", "a match"]
    jsonl = "".join(json.dumps({"text": t, "label": "x"}) + "\n" for t in texts)
    (tmp_path / "in.jsonl").write_text(jsonl + "\n", encoding="utf-8")
    for args, stdin in (
        (["--file", str(tmp_path / "in.jsonl")], None),
        (["--file", "-"], jsonl),
        ([], jsonl),
        ([], "one\ntwo\n\nthree\n"),
    ):
        routed = _invoke("route", *args, *served["admin"], "--json", input=stdin)
        assert routed.exit_code == 0, routed.output
        assert len(json.loads(routed.stdout)["decisions"]) == 3
    predicted = _invoke("predict", "-f", str(tmp_path / "in.jsonl"), *served["admin"], "--json")
    assert len(json.loads(predicted.stdout)["predictions"]) == 3
    bad = _invoke("route", *served["admin"], input='{"text": "ok"}\n{"txt": "no"}\n')
    assert bad.exit_code == 2 and 'line 2 is not a JSON object with a string "text"' in bad.output


def test_predict_takes_expert_id_prefixes(served: dict) -> None:
    expert_id = served["ids"][0]
    result = _invoke("predict", "hello", "--expert", expert_id[:7], *served["admin"], "--json")
    assert result.exit_code == 0, result.output
    (prediction,) = json.loads(result.stdout)["predictions"]
    assert [e["expert_id"] for e in prediction["experts"]] == [expert_id]


def test_piped_tables_are_not_cut_at_80_columns(
    served: dict, running: BackgroundCoordinator
) -> None:
    with moerge.Client(running.address, token=running.admin_token()) as api:
        api.set_expert_state(served["ids"][0], "retired", reason="superseded by a better expert")
    listed = _invoke("admin", "experts", "list", *served["admin"])
    assert listed.exit_code == 0, listed.output
    assert max(len(line) for line in listed.stdout.splitlines()) > 80
    assert "…" not in listed.stdout.replace("superseded by a better expert", "")
    assert served["ids"][0][:12] in listed.stdout
    assert "superseded by a better expert" in listed.stdout
    contributors = _invoke("admin", "contributors", "list", *served["admin"]).stdout
    assert (
        json.loads(_invoke("admin", "contributors", "list", *served["admin"], "--json").stdout)[
            "contributors"
        ][0]["contributor_id"]
        in contributors
    )


def test_my_experts_shows_state_and_reason(served: dict, running: BackgroundCoordinator) -> None:
    with moerge.Client(running.address, token=running.admin_token()) as api:
        api.set_expert_state(served["ids"][1], "quarantined", reason="checked by hand")
    result = _invoke("my-experts")  # the credential `join` saved in MOERGE_HOME
    assert result.exit_code == 0, result.output
    assert "quarantined" in result.stdout and "checked by hand" in result.stdout


def test_router_train_help_lists_the_registered_methods() -> None:
    from moerge.router_training.methods import available_methods

    assert sorted(ROUTER_METHODS) == available_methods()
    text = " ".join(_invoke("admin", "router", "train", "--help").stdout.split())
    assert all(name in text for name in ROUTER_METHODS)


def test_library_noise_is_silenced_unless_verbose(tiny_bert: Path, tmp_path: Path) -> None:
    """`moerge train` prints no transformers LOAD REPORT or FutureWarning; --verbose does."""
    from tests.contributor_client.toy import toy_examples, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", *toy_examples(40))
    train = [
        "train", str(data), "--task-name", "toy", "--out", str(tmp_path / "x"), "--offline",
        "--base-model", str(tiny_bert), "--epochs", "1", "--no-gates", "--stats-rank", "2",
        "--max-length", "16",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "HF_"))}
    outputs = {}
    for flags in ([], ["--verbose"]):
        done = subprocess.run(
            [sys.executable, "-m", "moerge.cli", *flags, *train],
            capture_output=True, text=True, timeout=300, env={**env, "COLUMNS": "200"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[bool(flags)] = done.stdout + done.stderr
    assert "LOAD REPORT" in outputs[True]
    assert "LOAD REPORT" not in outputs[False] and "FutureWarning" not in outputs[False]
    assert "it/s]" not in outputs[False]  # no tqdm bar between moerge's own progress bars


def test_train_refuses_a_bad_gate_learning_rate_before_training(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from tests.contributor_client.toy import toy_examples, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", *toy_examples(40))
    done = _invoke(
        "train", str(data), "--task-name", "toy", "--out", str(tmp_path / "x"), "--offline",
        "--base-model", str(tiny_bert), "--gate-lr", "-0.5",
    )  # fmt: skip
    assert done.exit_code != 0
    assert "learning_rate must be positive" in " ".join(done.output.split())
    assert not (tmp_path / "x").exists()


def test_experts_show_prints_every_field_whole(served: dict) -> None:
    shown = _invoke("admin", "experts", "show", served["ids"][0][:6], *served["admin"])
    assert shown.exit_code == 0, shown.output
    for name in ("adapter_config.json", "adapter_model.safetensors", "statistics.json"):
        assert f'"name": "{name}"' in shown.stdout
    assert "..." not in shown.stdout and "…" not in shown.stdout


def test_contribute_json_keeps_stdout_for_json_and_reports_progress_on_stderr(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    from tests.contributor_client.toy import toy_examples, write_jsonl

    with moerge.Client(running.address, token=running.admin_token()) as admin:
        invite = admin.create_enrollment_token().token
    with moerge.Client(running.address) as lab:
        credential = lab.join(invite, "lab", save=False).credential
    data = write_jsonl(tmp_path / "data.jsonl", *toy_examples(60))
    done = subprocess.run(
        [sys.executable, "-m", "moerge.cli", "contribute", str(data), "--task-name", "toy",
         "--base-model", str(tiny_bert), "--epochs", "1", "--no-gates", "--stats-rank", "2",
         "--max-length", "16", "-c", running.address, "--token", credential, "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)  # nothing but the JSON on stdout
    assert report["created"] is True and len(report["expert"]) == 32
    assert "steps  loss" in done.stderr  # the training bar
    assert "upload toy" in done.stderr  # the upload bar
