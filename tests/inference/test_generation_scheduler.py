"""Continuous batching: streamed generation equals PEFT's own, whoever shares the batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moerge.coordinator.inference.cache import SPARE_SLOTS
from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.errors import InputTooLong, InvalidTopK
from moerge.coordinator.inference.generation.multi_step import RowSampling
from moerge.coordinator.inference.generation.requests import (
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    GenerationRequest,
    GenerationStarted,
    RequestState,
    TextDelta,
)
from moerge.coordinator.inference.generation.sampling import SamplingParams, filter_top_k_top_p
from moerge.coordinator.inference.generation.scheduler import QueueFull, iter_events
from moerge.coordinator.inference.plan import Aggregation, MergeOptions, RoutingPlan
from moerge.coordinator.services.expert_store import read_lora
from moerge.router_training.arrow import ArrowRouter, ArrowRouterConfig
from moerge.router_training.base import ExpertRecord
from tests.inference.engine_helpers import (
    Held,
    make_causal_experts,
    peft_generate,
    submit_all,
    text_of,
)
from tests.tiny_models import make_tiny_llama

PROMPTS = ["the film was", "one two three four five", "a big red car on the road to the city"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("causal") / "llama")


@pytest.fixture(scope="module")
def experts(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_causal_experts(base, tmp_path_factory.mktemp("lm-experts"))


def lm_engine(base: Path, experts: dict[str, Path], **settings: object) -> InferenceEngine:
    """A causal-LM engine over the tiny Llama and its experts (``settings``: engine keywords)."""
    return InferenceEngine(
        base,
        "causal_lm",
        ["q_proj", "v_proj"],
        max_rank=8,
        max_length=32,
        expert_loader=experts.__getitem__,
        **settings,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def engine(base: Path, experts: dict[str, Path]) -> Iterator[InferenceEngine]:
    engine = lm_engine(base, experts, cache_bytes=1 << 30, max_new_tokens=NEW_TOKENS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def own_generations(base: Path, experts: dict[str, Path]) -> dict[str, list[str]]:
    return {e: peft_generate(base, {e: f}, PROMPTS, NEW_TOKENS) for e, f in experts.items()}


def greedy(max_new_tokens: int = NEW_TOKENS, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kwargs)  # type: ignore[arg-type]


def events_of(
    engine: InferenceEngine,
    prompt: str,
    plan: RoutingPlan | None = None,
    sampling: SamplingParams | None = None,
) -> list[GenerationEvent]:
    return list(
        iter_events(
            engine.scheduler,
            GenerationRequest,
            prompt=prompt,
            routing_text=prompt,
            sampling=sampling or greedy(),
            plan=plan,
        )
    )


def one(expert: str) -> RoutingPlan:
    return RoutingPlan.explicit([[expert]])


def test_streamed_generation_with_one_expert_equals_peft_greedy_generation(engine, own_generations):
    for expert, expected in own_generations.items():
        for prompt, text in zip(PROMPTS, expected, strict=True):
            events = events_of(engine, prompt, one(expert))
            assert isinstance(events[0], GenerationStarted)
            assert [w.expert_id for w in events[0].experts] == [expert]
            assert isinstance(events[-1], GenerationFinished)
            assert text_of(events) == text


def test_requests_batched_together_each_get_their_own_experts_text(engine, own_generations):
    chosen = ["lm-1", "lm-0", "lm-1", "lm-0"]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[2]]
    steps = engine.scheduler.steps
    rounds, admitted = engine.scheduler.admissions, engine.scheduler.admitted
    results, _ = submit_all(
        engine, [(p, one(e), greedy()) for p, e in zip(prompts, chosen, strict=True)]
    )
    for events, prompt, expert in zip(results, prompts, chosen, strict=True):
        assert text_of(events) == own_generations[expert][PROMPTS.index(prompt)]
    # all four shared the decode steps: at most NEW_TOKENS - 1 steps for 4 x 8 tokens
    assert engine.scheduler.steps - steps <= NEW_TOKENS - 1
    # queued together, so admitted (embedded and prefilled) in one round
    assert engine.scheduler.admissions - rounds == 1
    assert engine.scheduler.admitted - admitted == 4


def test_a_request_joining_a_running_batch_gets_the_same_text(engine, own_generations):
    long_running = GenerationRequest(
        prompt=PROMPTS[2],
        routing_text=PROMPTS[2],
        sampling=greedy(),
        sink=lambda e: None,
        plan=one("lm-0"),
    )
    events: list[GenerationEvent] = []
    first_delta = threading.Event()

    def sink(event: GenerationEvent) -> None:
        events.append(event)
        if isinstance(event, TextDelta):
            first_delta.set()

    long_running.sink = sink
    engine.scheduler.submit(long_running)
    assert first_delta.wait(30)
    joined = events_of(engine, PROMPTS[0], one("lm-1"))  # joins while the first one decodes
    assert text_of(joined) == own_generations["lm-1"][0]
    while long_running.state is not RequestState.FINISHED:
        threading.Event().wait(0.01)
    assert text_of(events) == own_generations["lm-0"][2]


def test_merges_ensembles_and_module_mixing_share_one_batch_with_exact_results(
    engine, base, experts, own_generations
):
    weights = [0.3, 0.7]
    linear = RoutingPlan.explicit([["lm-0", "lm-1"]], [weights], Aggregation.MERGE_LINEAR)
    ties = RoutingPlan.explicit(
        [["lm-0", "lm-1"]], [[0.4, 0.6]], Aggregation.MERGE_TIES, MergeOptions(density=0.5)
    )
    ensemble = RoutingPlan.explicit([["lm-0", "lm-1"]], [weights])
    record = ExpertRecord("lm-1", "lm-1", None, lambda: read_lora(experts["lm-1"]))
    arrow = RoutingPlan.routed(ArrowRouter.fit([record], ArrowRouterConfig(top_k=1)))
    specs = [
        (PROMPTS[0], linear, greedy()),
        (PROMPTS[1], ties, greedy()),
        (PROMPTS[2], arrow, greedy()),
        (PROMPTS[0], ensemble, greedy()),
        (PROMPTS[1], one("lm-0"), greedy()),
    ]
    results, _ = submit_all(engine, specs)
    assert (
        text_of(results[0])
        == peft_generate(base, experts, PROMPTS, NEW_TOKENS, combine=("cat", weights, {}))[0]
    )
    assert (
        text_of(results[1])
        == peft_generate(
            base, experts, PROMPTS, NEW_TOKENS, combine=("ties", [0.4, 0.6], {"density": 0.5})
        )[1]
    )
    assert text_of(results[2]) == own_generations["lm-1"][2]  # Arrow over one expert
    final = results[2][-1]
    assert isinstance(final, GenerationFinished)
    assert [w.expert_id for w in final.experts] == ["lm-1"]
    # the ensemble equals the engine's unary ensemble generation (tested against PEFT there)
    unary = engine.generate([PROMPTS[0]], ensemble)[0].output
    assert text_of(results[3]) == unary
    assert text_of(results[4]) == own_generations["lm-0"][1]
    assert "~" not in "".join(engine.bank.expert_ids)  # temporary merge slots were freed


def test_max_new_tokens_and_stop_strings_end_the_stream(engine, own_generations):
    full = own_generations["lm-0"][1]
    words = full.split()
    assert len(words) >= 3
    short = events_of(engine, PROMPTS[1], one("lm-0"), greedy(max_new_tokens=2))
    assert isinstance(short[-1], GenerationFinished)
    assert short[-1].finish_reason == "length" and short[-1].completion_tokens == 2
    stop = " " + words[2]
    stopped = events_of(engine, PROMPTS[1], one("lm-0"), greedy(stop=(stop,)))
    assert stopped[-1].finish_reason == "stop"
    assert text_of(stopped) == full[: full.index(stop)]


def test_the_same_seed_gives_the_same_sample_whatever_shares_the_batch(engine):
    sampling = greedy(temperature=1.5, top_p=0.95, top_k=20, seed=1234)
    alone = text_of(events_of(engine, PROMPTS[0], one("lm-0"), sampling))
    results, _ = submit_all(
        engine,
        [
            (PROMPTS[1], one("lm-1"), greedy(temperature=1.0)),
            (PROMPTS[0], one("lm-0"), sampling),
            (PROMPTS[2], one("lm-0"), greedy(repetition_penalty=1.3)),
        ],
    )
    assert text_of(results[1]) == alone


def test_a_cancelled_request_leaves_the_batch_and_frees_its_experts(engine, own_generations):
    events: list[GenerationEvent] = []
    request = GenerationRequest(
        prompt=PROMPTS[2],
        routing_text=PROMPTS[2],
        sampling=greedy(max_new_tokens=30),
        sink=events.append,
        plan=one("lm-1"),
    )
    with Held(engine):
        engine.scheduler.submit(request)
        request.cancel()
    assert text_of(events_of(engine, PROMPTS[0], one("lm-0"))) == own_generations["lm-0"][0]
    assert request.state is RequestState.CANCELLED
    assert engine.scheduler.load == (0, 0)
    assert engine.cache._pins["lm-1"] == 0  # no pin left behind


def test_bad_requests_fail_alone_with_a_clear_error(engine, own_generations):
    too_long = " ".join(["one"] * 40)
    results, _ = submit_all(
        engine,
        [
            (too_long, one("lm-0"), greedy()),
            (PROMPTS[0], RoutingPlan.routed(top_k=5), greedy()),
            (PROMPTS[0], one("lm-1"), greedy()),
        ],
    )
    assert isinstance(results[0][-1], GenerationFailed)
    assert isinstance(results[0][-1].error, InputTooLong)
    assert isinstance(results[1][-1], GenerationFailed)
    assert isinstance(results[1][-1].error, (InvalidTopK, ValueError))
    assert text_of(results[2]) == own_generations["lm-1"][0]


def test_a_full_queue_refuses_new_requests(base, experts):
    engine = lm_engine(base, experts, generation_max_waiting=1)
    try:
        with Held(engine):
            first = GenerationRequest(
                prompt="one",
                routing_text="one",
                sampling=greedy(2),
                sink=lambda e: None,
                plan=one("lm-0"),
            )
            engine.scheduler.submit(first)
            with pytest.raises(QueueFull):
                engine.scheduler.submit(
                    GenerationRequest(
                        prompt="two",
                        routing_text="two",
                        sampling=greedy(2),
                        sink=lambda e: None,
                        plan=one("lm-0"),
                    )
                )
    finally:
        engine.close()


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 10_000),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_k", -3),
        ("repetition_penalty", 0.0),
        ("stop", ("",)),
        ("stop", tuple("abcdefghi")),
    ],
)
def test_absurd_sampling_values_are_refused(field, value):
    from moerge.coordinator.inference.generation.sampling import InvalidSampling

    with pytest.raises(InvalidSampling):
        SamplingParams(**{field: value}).check(512)  # type: ignore[arg-type]


def test_top_k_one_sampling_is_greedy(engine, own_generations):
    sampling = greedy(temperature=2.0, top_k=1)
    assert (
        text_of(events_of(engine, PROMPTS[1], one("lm-0"), sampling)) == own_generations["lm-0"][1]
    )
    assert torch.is_grad_enabled()  # the scheduler never leaks no_grad into callers


def test_requests_admitted_together_are_embedded_for_routing_in_one_pass(engine, experts):
    from moerge.coordinator.services.expert_store import read_statistics
    from moerge.router_training import fit_router
    from moerge.router_training.base import ExpertRecord

    router = fit_router(
        "centroid",
        [ExpertRecord(e, statistics=read_statistics(f)) for e, f in experts.items()],
        {"top_k": 1},
    ).router
    plan = RoutingPlan.routed(router, 1)
    alone = [engine.route([p], plan)[0] for p in PROMPTS]
    calls = []
    original = engine.embed_batch
    engine.embed_batch = lambda texts: calls.append(len(texts)) or original(texts)
    try:
        results, _ = submit_all(engine, [(p, plan, greedy(2)) for p in PROMPTS])
    finally:
        del engine.embed_batch
    assert calls == [len(PROMPTS)]
    for events, expected in zip(results, alone, strict=True):
        started = events[0]
        assert isinstance(started, GenerationStarted)
        assert [w.expert_id for w in started.experts] == [w.expert_id for w in expected]


def test_causal_lm_routing_embeddings_are_the_contributors_embedding_space(engine, base):
    """The engine embeds prompts through the bare decoder (no LM head, no KV cache); the
    numbers must stay those contributors summarise with the whole causal LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.embedding import pooled_embeddings

    model = AutoModelForCausalLM.from_pretrained(base)
    expected = pooled_embeddings(model, AutoTokenizer.from_pretrained(base), PROMPTS)
    torch.testing.assert_close(engine.embed(PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_a_row_freed_mid_batch_is_reused_and_no_neighbours_text_changes(base, experts):
    """Three rows: the middle request is cancelled and a newcomer takes its row while the
    others decode; every text equals the same request generated alone."""
    engine = lm_engine(base, experts, generation_max_batch=3)
    try:
        specs = [
            (PROMPTS[2], one("lm-0")),
            (PROMPTS[1], one("lm-1")),
            (PROMPTS[0], one("lm-1")),
            (PROMPTS[1], one("lm-0")),
        ]
        alone = [text_of(events_of(engine, p, plan, greedy(24))) for p, plan in specs]
        results: list[list[GenerationEvent]] = [[] for _ in specs]
        finished = [threading.Event() for _ in specs]
        requests: list[GenerationRequest] = []

        def sink_for(i: int):
            def sink(event: GenerationEvent) -> None:
                results[i].append(event)
                if i == 0 and isinstance(event, TextDelta) and not requests[1].cancelled:
                    requests[1].cancel()  # frees row 1 while rows 0 and 2 decode
                    engine.scheduler.submit(requests[3])
                if isinstance(event, (GenerationFinished, GenerationFailed)):
                    finished[i].set()

            return sink

        for i, (prompt, plan) in enumerate(specs):
            requests.append(
                GenerationRequest(
                    prompt=prompt,
                    routing_text=prompt,
                    sampling=greedy(24),
                    sink=sink_for(i),
                    plan=plan,
                )
            )
        with Held(engine):
            for request in requests[:3]:
                engine.scheduler.submit(request)
        for i in (0, 2, 3):
            assert finished[i].wait(60)
        assert requests[1].state is RequestState.CANCELLED
        assert [text_of(results[i]) for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
        assert engine.scheduler.kv.free_rows == 3 and engine.scheduler.load == (0, 0)
    finally:
        engine.close()


def test_an_ensemble_wider_than_the_batch_fails_with_the_setting_to_raise(base, experts):
    engine = lm_engine(base, experts, generation_max_batch=1)
    try:
        ensemble = RoutingPlan.explicit([["lm-0", "lm-1"]], [[0.5, 0.5]])
        events = events_of(engine, PROMPTS[0], ensemble)
        assert isinstance(events[-1], GenerationFailed)
        assert "generation_max_batch" in str(events[-1].error)
        assert text_of(events_of(engine, PROMPTS[0], one("lm-0"))) != ""  # still serving
    finally:
        engine.close()


@pytest.fixture(scope="module")
def chunked(base: Path, experts: dict[str, Path]) -> Iterator[InferenceEngine]:
    """An engine decoding greedy batches four steps per host round trip."""
    engine = lm_engine(
        base, experts, cache_bytes=1 << 30, max_new_tokens=NEW_TOKENS, generation_steps_per_sync=4
    )
    yield engine
    engine.close()


def test_greedy_chunks_of_steps_give_the_text_of_single_steps(chunked, experts, own_generations):
    record = ExpertRecord("lm-1", "lm-1", None, lambda: read_lora(experts["lm-1"]))
    arrow = RoutingPlan.routed(ArrowRouter.fit([record], ArrowRouterConfig(top_k=1)))
    specs = [(p, one(e), greedy()) for e in ("lm-0", "lm-1") for p in PROMPTS]
    specs.append((PROMPTS[2], arrow, greedy()))  # token routing inside the chunk
    decodes = chunked.scheduler.decodes
    results, _ = submit_all(chunked, specs)
    for events, (prompt, plan, _) in zip(results[:-1], specs, strict=False):
        expert = plan.expert_ids[0][0]
        assert text_of(events) == own_generations[expert][PROMPTS.index(prompt)]
    assert text_of(results[-1]) == own_generations["lm-1"][2]
    assert [w.expert_id for w in results[-1][-1].experts] == ["lm-1"]
    # the first token comes from the prefill; the other 7 in chunks of 4 (4 + 4, one unread)
    assert chunked.scheduler.decodes - decodes == 2
    assert all(e[-1].completion_tokens == NEW_TOKENS for e in results)


def test_a_chunk_stops_each_request_at_its_budget_stop_string_or_eos(chunked, own_generations):
    full = own_generations["lm-0"][1]
    stop = " " + full.split()[2]
    results, _ = submit_all(
        chunked,
        [
            (PROMPTS[1], one("lm-0"), greedy(max_new_tokens=3)),
            (PROMPTS[1], one("lm-0"), greedy(stop=(stop,))),
            (PROMPTS[1], one("lm-0"), greedy(max_new_tokens=6)),
        ],
    )
    assert results[0][-1].finish_reason == "length" and results[0][-1].completion_tokens == 3
    assert results[1][-1].finish_reason == "stop"
    assert text_of(results[1]) == full[: full.index(stop)]
    assert results[2][-1].completion_tokens == 6
    assert full.startswith(text_of(results[2]))
    # an end-of-sequence token inside a chunk ends the request there
    scheduler = chunked.scheduler
    third = chunked.tokenizer(full, add_special_tokens=False)["input_ids"][2]
    scheduler.eos_ids.add(third)
    try:
        ended = events_of(chunked, PROMPTS[1], one("lm-0"))
    finally:
        scheduler.eos_ids.discard(third)
    assert ended[-1].finish_reason == "stop" and ended[-1].completion_tokens == 3
    assert full.startswith(text_of(ended))
    assert scheduler.kv.free_rows == scheduler.kv.max_rows  # every row given back


def test_a_seeded_sampling_request_makes_the_batch_decode_one_step_at_a_time(
    chunked, own_generations
):
    sampling = greedy(temperature=1.5, top_p=0.95, top_k=20, seed=1234)
    alone = text_of(events_of(chunked, PROMPTS[0], one("lm-0"), sampling))
    decodes = chunked.scheduler.decodes
    results, _ = submit_all(
        chunked, [(PROMPTS[0], one("lm-0"), sampling), (PROMPTS[1], one("lm-1"), greedy())]
    )
    assert text_of(results[0]) == alone
    assert text_of(results[1]) == own_generations["lm-1"][1]
    assert chunked.scheduler.decodes - decodes == NEW_TOKENS - 1


def test_unseeded_sampling_decodes_in_chunks_beside_greedy_requests(chunked, own_generations):
    decodes = chunked.scheduler.decodes
    results, _ = submit_all(
        chunked,
        [
            (PROMPTS[0], one("lm-0"), greedy(temperature=1.0, top_p=0.9)),
            (PROMPTS[1], one("lm-1"), greedy()),
        ],
    )
    assert results[0][-1].completion_tokens == NEW_TOKENS
    assert text_of(results[1]) == own_generations["lm-1"][1]  # greedy rows stay greedy
    assert chunked.scheduler.decodes - decodes == 2


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.5, 0, 0.8)]
)
def test_chunk_sampling_draws_from_the_samplers_distribution(temperature, top_k, top_p):
    """The Gumbel-max draw of a chunk samples softmax(filtered / T), as BatchSampler does."""
    rows, vocab = 40_000, 6
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0]).expand(rows, vocab)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    sampling = RowSampling(1, rows, vocab, torch.device("cpu"))
    sampling.fill([params] * rows, torch.Generator().manual_seed(0))
    drawn = sampling.choose(0, logits)
    observed = torch.bincount(drawn, minlength=vocab).float() / rows
    expected = torch.softmax(
        filter_top_k_top_p(logits[:1] / temperature, torch.tensor([top_k]), torch.tensor([top_p])),
        -1,
    )[0]
    assert torch.allclose(observed, expected, atol=0.01), (observed, expected)
    greedy_row = RowSampling(1, 1, vocab, torch.device("cpu"))
    greedy_row.fill([None], None)
    assert greedy_row.choose(0, logits[:1]).item() == 0  # rows of no request: argmax


def test_a_routers_first_request_sizes_the_bank_for_all_its_experts_at_once(base, experts):
    records = [ExpertRecord(e, e, None, lambda f=f: read_lora(f)) for e, f in experts.items()]
    arrow = RoutingPlan.routed(ArrowRouter.fit(records, ArrowRouterConfig(top_k=1)))
    engine = lm_engine(base, experts, cache_bytes=1 << 30, initial_capacity=1)
    try:
        results, _ = submit_all(engine, [(PROMPTS[0], arrow, greedy())])
        assert text_of(results[0])
        # one growth to the router's experts plus the merge spares, not doubling as they load
        assert engine.bank.capacity == len(records) + SPARE_SLOTS
    finally:
        engine.close()


def test_the_decode_path_says_which_fast_paths_run(engine) -> None:
    path = engine.scheduler.decode_path
    # the tiny Llama on the CPU in float32: attention is SDPA, so the grouped-query path takes
    # it; every CUDA or half-precision path stays off
    assert path["grouped-query decode attention"] is True
    off = [name for name, on in path.items() if name != "grouped-query decode attention"]
    assert not any(path[name] for name in off)
    assert set(path) >= {"BGMV kernels", "CUDA graphs", "KV write in one Triton kernel"}
