"""No raw data leaves a contributor: every byte of a real train + upload is inspected."""

from __future__ import annotations

import json
from pathlib import Path

from moerge.contributor_client.build import build_expert
from moerge.contributor_client.connection import Target
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.upload import describe_files, upload_expert
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import enroll
from tests.coordinator.test_uploads import CuttingProxy

SECRETS = [f"zorbleflux{i} quintessa{i * 7} river" for i in range(40)]


def test_every_byte_sent_holds_no_text_and_only_the_expert_files(
    coordinator: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    data = tmp_path / "private.jsonl"
    with data.open("w") as handle:
        for i, text in enumerate(SECRETS):
            handle.write(json.dumps({"text": text, "label": "odd" if i % 2 else "even"}) + "\n")
    config = TrainConfig(base_model=str(tiny_bert), epochs=1, batch_size=8, lora_rank=4)
    build_expert(data, tmp_path / "expert", "secret-task", config, progress=False)
    _, credential = enroll(coordinator.address, coordinator.admin_token(), "careful")
    proxy = CuttingProxy(coordinator.address, cut_after=None)
    try:
        target = Target(address=proxy.address, token=credential)
        response = upload_expert(
            target, tmp_path / "expert", "careful", "secret-task", progress=False
        )
    finally:
        proxy.close()
    assert response.created
    wire = bytes(proxy.client_bytes)
    for text in SECRETS:
        for word in text.split()[:2]:
            assert word.encode() not in wire, word
    files = sum(f.size for f in describe_files(tmp_path / "expert"))
    # the files themselves, plus framing (gRPC/HTTP2 headers, manifest, auth metadata)
    assert files <= len(wire) <= files + 64 * 1024
