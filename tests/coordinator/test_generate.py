"""Streamed generation through the real server: events, equality with Predict, bad input,
chat prompts and a client that leaves mid-stream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moerge.v1 import inference_pb2, inference_pb2_grpc
from tests.coordinator.causal_lm import causal_lm_coordinator
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path
) -> Iterator[BackgroundCoordinator]:
    """A causal-LM coordinator (SQLite) with two uploaded experts."""
    with causal_lm_coordinator(tmp_path_factory.mktemp("generate"), tiny_llama) as running:
        yield running


def stub(running: BackgroundCoordinator) -> tuple[grpc.Channel, object, tuple]:
    channel = grpc.insecure_channel(running.address)
    return channel, inference_pb2_grpc.InferenceServiceStub(channel), bearer(running.admin_token())


def events(running: BackgroundCoordinator, request: inference_pb2.GenerateRequest) -> list:
    channel, inference, auth = stub(running)
    with channel:
        return list(inference.Generate(request, metadata=auth))  # type: ignore[attr-defined]


def test_a_stream_is_start_then_deltas_then_end_and_equals_predict(served) -> None:
    prompt = "the film was"
    got = events(served, inference_pb2.GenerateRequest(prompt=prompt))
    kinds = [m.WhichOneof("event") for m in got]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert set(kinds[1:-1]) <= {"delta"}
    start, end = got[0].start, got[-1].end
    assert start.routing_method == "centroid" and "no router trained yet" in start.note
    assert len(start.experts) == 1 and start.experts[0].expert_name.startswith("lm")
    assert end.finish_reason in ("stop", "length")
    assert end.completion_tokens <= 8 and end.prompt_tokens > 0
    assert 0 < end.time_to_first_token_ms <= end.latency_ms
    text = "".join(m.delta.text for m in got[1:-1])
    channel, inference, auth = stub(served)
    with channel:
        unary = inference.Predict(  # type: ignore[attr-defined]
            inference_pb2.PredictRequest(inputs=[prompt]), metadata=auth
        ).predictions[0]
    assert text == unary.output
    assert [e.expert_id for e in unary.experts] == [e.expert_id for e in start.experts]


def test_chat_messages_use_the_chat_template_and_route_on_the_last_user_message(served) -> None:
    request = inference_pb2.GenerateRequest(
        messages=[
            inference_pb2.ChatMessage(role="system", content="be brief"),
            inference_pb2.ChatMessage(role="user", content="the film was good"),
        ],
        sampling=inference_pb2.SamplingParams(max_new_tokens=4),
    )
    got = events(served, request)
    start, end = got[0].start, got[-1].end
    assert end.completion_tokens <= 4
    # the rendered template is longer than the bare user message
    bare = events(served, inference_pb2.GenerateRequest(prompt="the film was good"))
    assert start.prompt_tokens > bare[0].start.prompt_tokens
    assert [e.expert_id for e in start.experts] == [e.expert_id for e in bare[0].start.experts]


@pytest.mark.parametrize(
    "request_, fragment",
    [
        (inference_pb2.GenerateRequest(), "exactly one of prompt and messages"),
        (inference_pb2.GenerateRequest(prompt="   "), "blank"),
        (
            inference_pb2.GenerateRequest(
                prompt="x", messages=[inference_pb2.ChatMessage(role="user", content="y")]
            ),
            "exactly one",
        ),
        (
            inference_pb2.GenerateRequest(
                messages=[inference_pb2.ChatMessage(role="robot", content="y")]
            ),
            "role",
        ),
        (
            inference_pb2.GenerateRequest(
                prompt="x", sampling=inference_pb2.SamplingParams(temperature=1e9)
            ),
            "temperature",
        ),
        (
            inference_pb2.GenerateRequest(
                prompt="x", sampling=inference_pb2.SamplingParams(top_p=-1)
            ),
            "top_p",
        ),
        (
            inference_pb2.GenerateRequest(
                prompt="x", sampling=inference_pb2.SamplingParams(max_new_tokens=100_000)
            ),
            "max_new_tokens",
        ),
        (
            inference_pb2.GenerateRequest(
                prompt="x", sampling=inference_pb2.SamplingParams(stop=["s"] * 20)
            ),
            "stop",
        ),
        (inference_pb2.GenerateRequest(prompt=" ".join(["one"] * 60)), "tokens"),
        (inference_pb2.GenerateRequest(prompt="x", top_k=9), "top_k"),
    ],
)
def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(
    served, request_, fragment
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        events(served, request_)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()
    assert events(served, inference_pb2.GenerateRequest(prompt="one two"))[-1].end


def test_a_client_that_leaves_mid_stream_frees_its_place(served) -> None:
    scheduler = served.state.inference.engine.scheduler
    channel, inference, auth = stub(served)
    with channel:
        call = inference.Generate(  # type: ignore[attr-defined]
            inference_pb2.GenerateRequest(
                prompt="one", sampling=inference_pb2.SamplingParams(max_new_tokens=100)
            ),
            metadata=auth,
        )
        first = next(call)
        assert first.WhichOneof("event") == "start"
        call.cancel()
    deadline = time.monotonic() + 10
    while scheduler.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.load == (0, 0)
    assert events(served, inference_pb2.GenerateRequest(prompt="one two"))[-1].end


def test_generate_on_a_classification_coordinator_is_a_failed_precondition(
    tmp_path: Path, tiny_bert: Path
) -> None:
    config = coordinator_config(tmp_path / "data", tiny_bert)
    with BackgroundCoordinator(config) as running, pytest.raises(grpc.RpcError) as caught:
        events(running, inference_pb2.GenerateRequest(prompt="hello"))
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "causal_lm" in caught.value.details()


def test_metrics_show_the_device_and_the_generation_load(served) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from moerge.coordinator.interceptors.metrics import StateCollector

    events(
        served,
        inference_pb2.GenerateRequest(
            prompt="one two", sampling=inference_pb2.SamplingParams(max_new_tokens=3)
        ),
    )
    registry = CollectorRegistry()
    registry.register(StateCollector(served.state))
    text = generate_latest(registry).decode()
    assert (
        'moerge_inference_device_info{device="cpu",dtype="float32",task_type="causal_lm"} 1.0'
        in text
    )
    tokens = float(
        next(
            line.split()[-1]
            for line in text.splitlines()
            if line.startswith("moerge_generation_tokens_total")
        )
    )
    assert tokens >= 1

    def value(name: str) -> float:
        return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name)))

    # every request so far was admitted in a round of its own or with others
    assert value("moerge_generation_admissions_total") >= 1
    assert value("moerge_generation_admissions_total") <= value(
        "moerge_generation_admitted_requests_total"
    )
    assert "moerge_generation_running 0.0" in text
    assert "moerge_generation_graph_replays_total 0.0" in text  # CPU: no CUDA graphs
    assert "moerge_generation_graphs_pending 0.0" in text
    phases = {
        line.split('"')[1]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("moerge_generation_seconds_total{")
    }
    assert phases.keys() == {"route", "prefill", "decode", "capture"}
    assert phases["route"] > 0 and phases["prefill"] > 0 and phases["decode"] > 0
    assert phases["capture"] == 0.0  # CPU: nothing captured


def test_moerge_generate_streams_the_text_to_stdout_and_the_routing_to_stderr(served) -> None:
    import json as json_module

    from typer.testing import CliRunner

    from moerge.cli import app

    prompt = "the film was"
    expected = "".join(
        m.delta.text for m in events(served, inference_pb2.GenerateRequest(prompt=prompt))[1:-1]
    )
    auth = ["--coordinator", served.address, "--token", served.admin_token()]
    result = CliRunner().invoke(app, ["generate", prompt, *auth])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == expected
    assert "centroid" in result.stderr and "generated tokens" in result.stderr
    lines = (
        CliRunner()
        .invoke(app, ["generate", prompt, "--json", "--max-new-tokens", "2", *auth])
        .stdout.splitlines()
    )
    kinds = [next(iter(json_module.loads(line))) for line in lines]
    assert kinds[0] == "GenerateStart" and kinds[-1] == "GenerateEnd"
    bad = CliRunner().invoke(app, ["generate", prompt, "--temperature", "99", *auth])
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.stderr
