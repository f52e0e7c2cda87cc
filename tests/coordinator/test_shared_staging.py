"""Two coordinators' upload receivers over one staging folder (``upload_staging_dir``) take
turns on one chunked upload: each sees the bytes the other staged, so a stale offset is
refused instead of appended. The replica-process test is tests/reliability/test_shared_staging.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moerge.contributor_client.upload import describe_files
from moerge.coordinator.state import CoordinatorState
from moerge.coordinator.uploads.receiver import Manifest, ManifestFile
from moerge.refusals import FailedPrecondition
from tests.coordinator.conftest import coordinator_config
from tests.experts import make_expert_dir


def test_two_receivers_on_one_staging_folder_resume_from_each_others_bytes(
    tmp_path: Path, tiny_bert: Path
) -> None:
    folder = make_expert_dir(tiny_bert, tmp_path / "expert")
    files = describe_files(folder)
    data = b"".join(f.path.read_bytes() for f in files)
    manifest = Manifest(
        "shared-staging-1",
        "e",
        "toy",
        "",
        tuple(ManifestFile(f.name, f.size, f.sha256) for f in files),
    )
    shared = {"upload_staging_dir": str(tmp_path / "staging")}
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    first, second = (
        CoordinatorState.open(coordinator_config(tmp_path / name, tiny_bert, url, **shared))
        for name in ("a", "b")
    )
    _, invitation = first.registry.create_enrollment_token("admin:test")
    contributor = first.registry.join(invitation, "alice")[0].id
    third = len(data) // 3

    first.uploads.start(contributor, manifest)
    assert first.uploads.append(contributor, manifest.upload_id, 0, data[:third]) == third
    # the second replica takes over from what the first staged
    assert second.uploads.start(contributor, manifest).received_bytes == third
    second.uploads.append(contributor, manifest.upload_id, third, data[third : 2 * third])
    # the first still remembers `third` bytes: its offset is refused, not appended
    with pytest.raises(FailedPrecondition, match=f"resume from {2 * third}"):
        first.uploads.append(contributor, manifest.upload_id, third, data[third : 2 * third])
    first.uploads.append(contributor, manifest.upload_id, 2 * third, data[2 * third :])
    expert, created = second.uploads.finish(
        f"contributor:{contributor}", contributor, "shared-staging-1"
    )
    assert created and expert.name == "e"
    assert not list((tmp_path / "staging").rglob("*.d"))  # committed: nothing staged is left
