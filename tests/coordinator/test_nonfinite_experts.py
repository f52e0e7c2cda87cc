"""One expert's overflow must not turn a shared ensemble into NaN: it is dropped, with a note."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.coordinator.inference.aggregation import ensemble_distributions
from moerge.coordinator.inference.heads import ClassificationHead
from moerge.expert_format import ADAPTER_WEIGHTS
from moerge.refusals import FailedPrecondition
from moerge.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir


def _head(labels: tuple[str, ...]) -> ClassificationHead:
    return ClassificationHead(torch.zeros(len(labels), 4), torch.zeros(len(labels)), labels)


def test_a_non_finite_expert_is_dropped_and_the_others_renormalised() -> None:
    heads = [_head(("neg", "pos"))] * 3
    result = ensemble_distributions(
        ["a", "b", "c"],
        [0.5, 0.01, 0.49],
        [[0.2, 0.8], [math.nan, math.nan], [0.4, 0.6]],
        heads,
    )
    assert result.expert_ids == ("a", "c")
    assert sum(result.weights) == pytest.approx(1.0)
    assert result.weights[0] == pytest.approx(0.5 / 0.99)
    assert result.label == "pos"
    assert result.confidence == pytest.approx((0.5 * 0.8 + 0.49 * 0.6) / 0.99)
    assert all(math.isfinite(p) for p in result.probabilities)
    assert [o.expert_id for o in result.expert_outputs] == ["a", "c"]
    assert result.notes and "b" in result.notes[0] and "NaN or Inf" in result.notes[0]


def test_finite_experts_are_combined_without_a_note() -> None:
    result = ensemble_distributions(
        ["a", "b"], [0.75, 0.25], [[0.2, 0.8], [0.6, 0.4]], [_head(("neg", "pos"))] * 2
    )
    assert result.notes == ()
    assert result.weights == (0.75, 0.25)
    assert result.confidence == pytest.approx(0.75 * 0.8 + 0.25 * 0.4)


def test_when_every_expert_is_non_finite_the_prediction_fails_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="NaN or Inf"):
        ensemble_distributions(["a"], [1.0], [[math.inf, 0.0]], [_head(("neg", "pos"))])


def test_predict_drops_an_overflowing_expert_admitted_before_the_weight_bound(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights of 3e38 (finite float32) once gave every Predict the expert joined NaN scores."""
    config = coordinator_config(tmp_path / "data", tiny_bert)
    with BackgroundCoordinator(config) as running:
        _, credential = enroll(running.address, running.admin_token(), "lab")
        target = Target(address=running.address, token=credential)
        ids = []
        for i in range(2):
            folder = make_expert_dir(tiny_bert, tmp_path / f"e{i}", seed=i, task_name="toy")
            if i == 1:
                weights = load_file(str(folder / ADAPTER_WEIGHTS))
                for key in weights:  # every LoRA factor at 3e38: the layer overflows
                    if "lora_" in key:
                        weights[key] = torch.full_like(weights[key], 3e38)
                save_file(weights, str(folder / ADAPTER_WEIGHTS))
                # as if admitted before validation bounded magnitudes
                monkeypatch.setattr(
                    "moerge.coordinator.uploads.validation.MAX_WEIGHT_MAGNITUDE", 1e39
                )
            uploaded = upload_expert(target, folder, f"expert{i}", "toy", progress=False)
            ids.append(uploaded.expert.expert_id)
        with grpc.insecure_channel(running.address) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).TrainRouter(
                admin_pb2.TrainRouterRequest(method="uniform"),
                metadata=bearer(running.admin_token()),
            )
            response = inference_pb2_grpc.InferenceServiceStub(channel).Predict(
                inference_pb2.PredictRequest(
                    inputs=["the film was great"],
                    top_k=2,
                    aggregation=inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE,
                ),
                metadata=bearer(running.admin_token()),
            )
    (prediction,) = response.predictions
    assert math.isfinite(prediction.confidence)
    assert [e.expert_id for e in prediction.experts] == [ids[0]]
    assert prediction.experts[0].weight == pytest.approx(1.0)
    assert ids[1] in response.note and "NaN or Inf" in response.note
