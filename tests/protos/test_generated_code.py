"""The committed protobuf code is exactly what protos/generate.py makes from the .proto files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("generate", REPO / "protos" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path)
    assert written, "protoc wrote nothing"
    committed = REPO / "protos" / "moerge" / "v1"
    for path in written:
        mine = committed / path.name
        assert mine.exists(), f"{path.name} is not committed: run `make proto`"
        assert mine.read_text() == path.read_text(), f"{path.name} is stale: run `make proto`"
    names = {p.name for p in written}
    extra = {p.name for p in committed.glob("*_pb2*.py*")} - names
    assert not extra, f"generated files without a .proto source: {sorted(extra)}"


def test_api_is_versioned_and_has_the_three_services() -> None:
    from moerge.v1 import admin_pb2, contributor_pb2, inference_pb2

    services = {
        s.full_name
        for module in (admin_pb2, contributor_pb2, inference_pb2)
        for s in module.DESCRIPTOR.services_by_name.values()
    }
    assert services == {
        "moerge.v1.AdminService",
        "moerge.v1.ContributorService",
        "moerge.v1.InferenceService",
    }
