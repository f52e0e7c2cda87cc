"""Streamed generation on a CUDA device gives the CPU engine's text (skipped without a GPU).

The CPU tests pin the scheduler's behaviour against PEFT; these check that nothing in the
continuous-batching loop (fixed KV rows, CUDA-graph replays, per-row bank slots, token routing,
sampling) silently falls back to the CPU or changes the result when the engine is placed on a
GPU. float32 keeps
greedy decoding comparable token for token; bfloat16 is checked to run and stay on the device.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.generation.requests import (
    GenerationFinished,
    GenerationRequest,
    TextDelta,
)
from moerge.coordinator.inference.generation.sampling import SamplingParams
from moerge.coordinator.inference.generation.scheduler import iter_events
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.coordinator.services.expert_store import read_lora
from moerge.router_training.arrow import ArrowRouter, ArrowRouterConfig
from moerge.router_training.base import ExpertRecord
from moerge.triton_support import triton
from tests.inference.engine_helpers import make_causal_experts, submit_all, text_of
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["the film was", "one two three four five", "a big red car on the road to the city"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("causal") / "llama")


@pytest.fixture(scope="module")
def experts(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_causal_experts(base, tmp_path_factory.mktemp("lm-experts"))


def make_engine(
    base: Path,
    experts: dict[str, Path],
    device: str,
    dtype: torch.dtype | None = None,
    **settings: object,
) -> InferenceEngine:
    """A causal-LM engine over the tiny Llama (``settings``: more engine keywords)."""
    return InferenceEngine(
        base,
        "causal_lm",
        ["q_proj", "v_proj"],
        max_rank=8,
        cache_bytes=1 << 30,
        max_length=32,
        max_new_tokens=NEW_TOKENS,
        expert_loader=experts.__getitem__,
        device=device,
        dtype=dtype,
        **settings,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def engines(base: Path, experts: dict[str, Path]) -> Iterator[dict[str, InferenceEngine]]:
    pair = {"cpu": make_engine(base, experts, "cpu"), "cuda": make_engine(base, experts, "cuda")}
    yield pair
    for engine in pair.values():
        engine.close()


def stream(engine: InferenceEngine, prompt: str, plan: RoutingPlan) -> tuple[str, list]:
    events = list(
        iter_events(
            engine.scheduler,
            GenerationRequest,
            prompt=prompt,
            routing_text=prompt,
            sampling=SamplingParams(max_new_tokens=NEW_TOKENS),
            plan=plan,
        )
    )
    assert isinstance(events[-1], GenerationFinished), events[-1]
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events


def arrow_plan(experts: dict[str, Path]) -> RoutingPlan:
    records = [ExpertRecord(e, e, None, lambda f=f: read_lora(f)) for e, f in experts.items()]
    return RoutingPlan.routed(ArrowRouter.fit(records, ArrowRouterConfig(top_k=2)))


def test_cuda_engine_streams_the_cpu_engines_greedy_text_per_expert(engines, experts):
    assert engines["cuda"].device.type == "cuda"
    for expert in experts:
        plan = RoutingPlan.explicit([[expert]])
        for prompt in PROMPTS:
            assert (
                stream(engines["cuda"], prompt, plan)[0] == stream(engines["cpu"], prompt, plan)[0]
            )


def test_cuda_token_level_routing_streams_the_cpu_engines_text(engines, experts):
    plan = arrow_plan(experts)
    for prompt in PROMPTS:
        gpu_text, gpu_events = stream(engines["cuda"], prompt, plan)
        cpu_text, _ = stream(engines["cpu"], prompt, plan)
        assert gpu_text == cpu_text
        assert {w.expert_id for w in gpu_events[-1].experts} <= set(experts)


def test_bfloat16_cuda_engine_generates_with_its_weights_on_the_gpu(base, experts):
    engine = make_engine(base, experts, "cuda", torch.bfloat16)
    try:
        parameter = next(engine.model.parameters())
        assert parameter.is_cuda and parameter.dtype == torch.bfloat16
        _text, events = stream(engine, PROMPTS[2], arrow_plan(experts))
        assert 1 <= events[-1].completion_tokens <= NEW_TOKENS
        path = engine.scheduler.decode_path  # bf16 on CUDA: the fused paths are on
        assert path["fused RMSNorm"] and path["CUDA graphs"]
        if triton is not None:
            assert path["RMSNorm in one Triton kernel"] and path["BGMV kernels"]
            assert path["KV write in one Triton kernel"]
    finally:
        engine.close()


def test_graph_replayed_decode_steps_give_the_eager_steps_text(base, experts):
    """float32: batches decoded by replaying captured CUDA graphs (example routing, merges),
    one step or a greedy chunk of steps per replay, equal the same batches decoded eagerly one
    step at a time; token routing (float32 mixing reads back to the host) and a mixed batch run
    eagerly, with the same text."""
    engines = {
        "chunks": make_engine(base, experts, "cuda"),  # auto: 8 greedy steps per replay
        "steps": make_engine(base, experts, "cuda", generation_steps_per_sync=1),
        "eager": make_engine(
            base, experts, "cuda", generation_cuda_graphs=False, generation_steps_per_sync=1
        ),
    }
    try:
        sampling = SamplingParams(max_new_tokens=NEW_TOKENS)
        merge = RoutingPlan.explicit([["lm-0", "lm-1"]], [[0.3, 0.7]], Aggregation.MERGE_LINEAR)
        example = [(p, RoutingPlan.explicit([[e]]), sampling) for e in experts for p in PROMPTS]
        example.append((PROMPTS[0], merge, sampling))
        arrow = arrow_plan(experts)  # one router object: one token-routing form, one graph
        token = [(p, arrow, sampling) for p in PROMPTS]
        batches = [example, token, example[:2] + token[:1]]
        texts = {
            name: [[text_of(events) for events in submit_all(engine, b)[0]] for b in batches]
            for name, engine in engines.items()
        }
        assert texts["chunks"] == texts["eager"]
        assert texts["steps"] == texts["eager"]
        assert all(text for batch in texts["eager"] for text in batch)
        for name in ("chunks", "steps"):
            graphs = engines[name].scheduler.graphs
            assert graphs is not None and graphs.failures == []
            assert graphs.captures >= 1 and graphs.replays > 0
        chunks, steps = engines["chunks"].scheduler, engines["steps"].scheduler
        assert chunks.decodes < steps.decodes  # several steps per host round trip
        # unseeded sampling runs in captured chunks too (noise drawn before each chunk)
        hot = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=50, top_p=0.9)
        sampled, _ = submit_all(engines["chunks"], [(p, example[0][1], hot) for p in PROMPTS])
        assert all(events[-1].completion_tokens >= 1 for events in sampled)
        assert chunks.graphs is not None and chunks.graphs.failures == []
        assert engines["eager"].scheduler.graphs is None
    finally:
        for engine in engines.values():
            engine.close()


def test_bfloat16_token_routing_decodes_by_graph_replays(base, experts):
    """In half precision the fused token-mixing kernel never reads back to the host, so Arrow's
    every-token routing is captured and replayed like example routing."""
    engine = make_engine(base, experts, "cuda", torch.bfloat16)
    try:
        arrow = arrow_plan(experts)  # one router for the batch (a router each would run eagerly)
        batch = [(p, arrow, SamplingParams(max_new_tokens=NEW_TOKENS)) for p in PROMPTS]
        results, _ = submit_all(engine, batch)
        graphs = engine.scheduler.graphs
        assert graphs is not None and graphs.failures == []
        assert graphs.captures >= 1 and graphs.replays > 0
        for events in results:
            final = events[-1]
            assert isinstance(final, GenerationFinished)
            assert final.completion_tokens >= 1 and final.experts  # routed, usage reported
    finally:
        engine.close()


def test_idle_worker_captures_every_rows_bucket_so_later_bursts_capture_nothing(base, experts):
    """After a batch of 3 rows (bucket 4) the idle worker captures the form's narrower buckets
    (not 8: no batch was that wide); a later batch of another size replays a graph at once, and
    its text is unchanged."""
    engine = make_engine(base, experts, "cuda", generation_max_batch=8)
    try:
        plan = RoutingPlan.explicit([["lm-0"]])
        sampling = SamplingParams(max_new_tokens=NEW_TOKENS)
        first, _ = submit_all(engine, [(p, plan, sampling) for p in PROMPTS])
        graphs = engine.scheduler.graphs
        assert graphs is not None
        deadline = time.monotonic() + 120
        time.sleep(0.2)  # the worker's step after the batch counts what is missing
        while engine.scheduler.graphs_pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.executor.submit(graphs.pending).result() == 0
        assert graphs.failures == []
        captured = graphs.captures
        assert captured >= 3  # 1, 2 and 4 rows
        assert {key[0] for key in graphs._graphs} >= {1, 2, 4}
        assert 8 not in {key[0] for key in graphs._graphs}
        again, _ = submit_all(engine, [(p, plan, sampling) for p in PROMPTS[:1]])
        assert graphs.captures == captured  # one row: bucket 1, captured while idle
        assert text_of(again[0]) == text_of(first[0])
    finally:
        engine.close()
