"""Continuous batching for routed generation: requests join and leave between decode steps.

One scheduler per causal-LM :class:`~..engine.InferenceEngine`. Its loop runs on the engine's
single worker thread, one *step* per executor job, so Predict batches and expert loads queued on
the same worker interleave with decoding instead of waiting for whole generations. A step:

1. drops cancelled requests (their rows, pinned experts and temporary merge slots are freed);
2. admits waiting requests while rows are free: routes each prompt (example-level routers embed
   ``routing_text`` once; token-level routers decide inside every forward), tokenizes it,
   prefills the newcomers together (left-padded) and samples their first token, then copies
   their keys and values into free rows of the running batch (:class:`~.kv_rows.KVRows`);
3. runs one decode step for every running row (on CUDA, a replay of a captured graph:
   :mod:`.cuda_graphs`) and samples each request's next token
   (:class:`~.sampling.BatchSampler`), or, when no running request needs the host between
   steps, a chunk of up to ``steps_per_sync`` steps on the device (:mod:`.multi_step`); streams
   text
   deltas (:class:`~.detokenizer.StreamingDetokenizer`), and retires requests that hit EOS, a
   stop string or their token budget.

Rows and routing. A request occupies one row, or ``k`` adjacent rows for an output ensemble (the
weighted mixture of its experts' next-token distributions: ``log sum_j w_j p_j``); how the LoRA
bank routes each row in a forward is :mod:`.batch_routing`'s job.

Why not transformers' ``ContinuousBatchingManager``: it packs every sequence into one row of a
paged cache, and the bank needs to know which request each token belongs to (see
:mod:`.kv_rows`).
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from moerge.coordinator.inference.errors import InvalidPlan
from moerge.coordinator.inference.generation import fused_norm, kv_write_triton
from moerge.coordinator.inference.generation.attention import use_decode_attention
from moerge.coordinator.inference.generation.batch_routing import BatchRouting
from moerge.coordinator.inference.generation.cuda_graphs import DecodeGraphs
from moerge.coordinator.inference.generation.detokenizer import add_tokens
from moerge.coordinator.inference.generation.fused_norm import use_fused_rms_norm
from moerge.coordinator.inference.generation.fused_rope import use_fused_rotary
from moerge.coordinator.inference.generation.kv_rows import KVRows
from moerge.coordinator.inference.generation.multi_step import (
    RowSampling,
    chunk_mode,
    decode_chunk,
)
from moerge.coordinator.inference.generation.requests import (
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    GenerationRequest,
    GenerationStarted,
    RequestState,
    TextDelta,
)
from moerge.coordinator.inference.generation.running import (
    Running,
    prepare,
    routing_embeddings,
)
from moerge.coordinator.inference.generation.sampling import BatchSampler, SamplingParams
from moerge.triton_support import triton

if TYPE_CHECKING:
    from moerge.coordinator.inference.engine import InferenceEngine

log = logging.getLogger(__name__)


def decode_path(
    engine: InferenceEngine, packed: bool, norms: int, rotary: bool, graphs: bool
) -> dict[str, bool]:
    """The decode step's fast paths, by name, and whether each is in use: what an operator
    checks in the log when a GPU server decodes slower than expected (docs/inference.md)."""
    parameter = next(engine.model.parameters(), None)
    triton_here = triton is not None and parameter is not None and parameter.is_cuda
    half = parameter is not None and parameter.dtype in (torch.float16, torch.bfloat16)
    return {
        "grouped-query decode attention": packed,
        "fused RMSNorm": norms > 0,
        "RMSNorm in one Triton kernel": norms > 0
        and triton_here
        and half
        and fused_norm.TRITON_KERNEL,
        "fused rotary (Liger)": rotary,
        "BGMV kernels": bool(engine.bank.bgmv_kernels) and triton_here and half,
        "KV write in one Triton kernel": triton_here and kv_write_triton.TRITON_KERNEL,
        "CUDA graphs": graphs,
    }


class QueueFull(RuntimeError):
    """More requests are waiting than the scheduler accepts; the caller should retry later."""


class GenerationScheduler:
    """Continuous batching over one engine (see the module docstring)."""

    def __init__(
        self,
        engine: InferenceEngine,
        max_batch_rows: int = 32,
        max_waiting: int = 256,
        cuda_graphs: bool = True,
        steps_per_sync: int = 1,
    ) -> None:
        if max_batch_rows < 1 or max_waiting < 0 or steps_per_sync < 1:
            raise ValueError("max_batch_rows and steps_per_sync must be >= 1 and max_waiting >= 0")
        self.engine = engine
        self.steps_per_sync = steps_per_sync
        self.max_batch_rows = max_batch_rows
        self.max_waiting = max_waiting
        self.sampler = BatchSampler(engine.device)
        self.kv = KVRows(max_batch_rows)
        self.running: list[Running] = []
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._forward: BatchRouting | None = None  # decode routing, rebuilt when the batch changes
        tokenizer = engine.tokenizer
        eos = engine.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        packed = use_decode_attention(engine.model)  # grouped heads attend without copied keys
        norms = use_fused_rms_norm(engine.model)  # on CUDA: one or two kernels per norm, not 8
        # on CUDA with Liger-Kernel: one kernel per layer
        rotary = bool(engine.generation_fused_rotary) and use_fused_rotary(engine.model)
        # transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept both releases
        forward = inspect.signature(engine.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        #: captured decode steps (CUDA only; see :mod:`.cuda_graphs`)
        self.graphs = (
            DecodeGraphs(engine, self.kv, self.cache_kwarg, self.pad_id)
            if cuda_graphs and DecodeGraphs.enabled_for(engine)
            else None
        )
        #: which of the decode step's fast paths this model and device got (logged once)
        self.decode_path = decode_path(engine, packed, norms, rotary, self.graphs is not None)
        log.info(
            "generation decode path: %s",
            "; ".join(f"{name} {'on' if on else 'off'}" for name, on in self.decode_path.items()),
        )
        config = engine.model.config
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        self.steps = 0  # decode steps run (for metrics and tests)
        self.decodes = 0  # host round trips of decoding: steps, or chunks of greedy steps
        self.tokens = 0  # tokens generated (for metrics)
        #: admission rounds that admitted requests, and the requests they admitted (metrics:
        #: a burst whose requests arrive spread out is admitted in many small rounds, each with
        #: its own embedding pass and prefill)
        self.admissions = 0
        self.admitted = 0
        #: worker seconds per phase (metrics): routing the newcomers (embedding, tokenizing,
        #: binding experts), their prefill, and decoding (graph captures counted apart, in
        #: :attr:`.cuda_graphs.DecodeGraphs.capture_seconds`)
        self.seconds = {"route": 0.0, "prefill": 0.0, "decode": 0.0}
        #: CUDA graphs the idle worker will still capture (metrics; read from any thread)
        self.graphs_pending = 0

    # -- the caller's side (any thread) ----------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; its events go to ``request.sink``. Raises :class:`QueueFull`."""
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(
                    f"{len(self.waiting)} generation requests are waiting; try again shortly"
                )
            self.waiting.append(request)
            self._schedule_locked()

    @property
    def load(self) -> tuple[int, int]:
        """(running requests, waiting requests)."""
        return len(self.running), len(self.waiting)

    def _schedule_locked(self) -> None:
        if self._scheduled:
            return
        try:
            self.engine.executor.submit(self._step)
        except RuntimeError:  # the engine is closing: nothing will run any more
            self._fail_waiting_locked(RuntimeError("the inference engine is closed"))
            return
        self._scheduled = True

    def _fail_waiting_locked(self, error: BaseException) -> None:
        while self.waiting:
            request = self.waiting.popleft()
            request.state = RequestState.FAILED
            request.sink(GenerationFailed(error))

    # -- the worker's side -----------------------------------------------------------------
    def _step(self) -> None:
        try:
            with torch.no_grad():
                self._drop_cancelled()
                self._admit()
                if self.running:
                    began = time.perf_counter()
                    captured = self.graphs.capture_seconds if self.graphs is not None else 0.0
                    self._decode()
                    captured = (self.graphs.capture_seconds if self.graphs else 0.0) - captured
                    self.seconds["decode"] += time.perf_counter() - began - captured
                elif self.graphs is not None and not self.waiting:
                    # nothing to serve: capture a graph the next bursts will need, one per
                    # turn so that a request arriving meanwhile waits for one capture at most
                    self.graphs.capture_missing()
                if self.graphs is not None and not self.running:  # counted when idle only:
                    self.graphs_pending = self.graphs.pending()  # not on every decode step
        except Exception as exc:  # a failed forward: fail what ran, keep serving
            self.graphs_pending = 0  # and no idle capture retried in a loop
            log.exception(
                "generation step failed; failing %d running request(s)", len(self.running)
            )
            self._retire(list(self.running), error=exc)
        finally:
            with self._lock:
                self._scheduled = False
                if self.running or self.waiting or self.graphs_pending:
                    self._schedule_locked()

    def _drop_cancelled(self) -> None:
        gone = [m for m in self.running if m.request.cancelled]
        if gone:
            self._retire(gone, cancelled=True)

    def _admit(self) -> None:
        free = self.kv.free_rows
        candidates: list[GenerationRequest] = []
        with self._lock:  # at least one row each; an ensemble may need more (checked below)
            while self.waiting and len(candidates) < free:
                request = self.waiting.popleft()
                if request.cancelled:
                    request.state = RequestState.CANCELLED
                else:
                    candidates.append(request)
        if not candidates:
            return
        began = time.perf_counter()
        embeddings = routing_embeddings(self.engine, candidates)
        admitted: list[Running] = []
        for i, request in enumerate(candidates):
            try:
                member = prepare(
                    self.engine, self.sampler, request, embeddings.get(i), self.max_positions
                )
            except Exception as exc:
                request.state = RequestState.FAILED
                request.sink(GenerationFailed(exc))
                continue
            if member.rows > self.kv.max_rows:
                member.resources.close()
                request.state = RequestState.FAILED
                request.sink(
                    GenerationFailed(
                        InvalidPlan(
                            f"an output ensemble of {member.rows} experts decodes "
                            f"{member.rows} rows; the batch holds {self.kv.max_rows} "
                            "(generation_max_batch)"
                        )
                    )
                )
                continue
            start = self.kv.allocate(member.rows)
            if start is None:
                member.resources.close()  # no room yet: back to the front of the queue
                with self._lock:
                    self.waiting.extendleft(reversed(candidates[i:]))
                break
            member.row = start
            request.state = RequestState.RUNNING
            request.sink(
                GenerationStarted(
                    experts=member.experts,
                    aggregation=member.aggregation,
                    prompt_tokens=len(member.prompt_ids),
                )
            )
            admitted.append(member)
            free -= member.rows
        routed = time.perf_counter()
        self.seconds["route"] += routed - began
        if admitted:
            self.admissions += 1
            self.admitted += len(admitted)
            self._prefill(admitted)
            self.seconds["prefill"] += time.perf_counter() - routed

    def _prefill(self, members: list[Running]) -> None:
        engine = self.engine
        prompts = [m.prompt_ids for m in members for _ in range(m.rows)]
        length = max(len(p) for p in prompts)
        input_ids = torch.tensor(
            [[self.pad_id] * (length - len(p)) + p for p in prompts], device=engine.device
        )  # [R_new, P]
        mask = torch.tensor(
            [[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=engine.device
        )
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        cache = DynamicCache()
        starts = [sum(m.rows for m in members[:i]) for i in range(len(members))]
        forward = BatchRouting(self.engine, members, starts, len(prompts))
        try:
            with forward.context(mask):
                out = engine.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                    **{self.cache_kwarg: cache},
                )
            forward.flush_usage()
            need = max(len(m.prompt_ids) + m.request.sampling.max_new_tokens for m in members)
            self.kv.write_prompt(
                [m.row for m in members], [m.rows for m in members], cache, mask, need
            )
        except Exception as exc:  # these newcomers fail; the running batch goes on
            log.exception("prefill of %d request(s) failed", len(members))
            for m in members:
                self.kv.release(m.row, m.rows)
                m.resources.close()
                m.request.state = RequestState.FAILED
                m.request.sink(GenerationFailed(exc))
            return
        self.running.extend(members)
        self._forward = None
        self._advance(members, out.logits[:, -1])

    def _decode(self) -> None:
        """One decode step, or a greedy chunk, over the rows in use (padded up to a graph's
        bucket on CUDA)."""
        engine, kv = self.engine, self.kv
        rows = kv.used_bound
        if self.graphs is not None:
            rows = self.graphs.bucket(rows)
        order = [m.row + j for m in self.running for j in range(m.rows)]  # member order
        ids = [self.pad_id] * rows
        for m in self.running:
            for j in range(m.rows):
                ids[m.row + j] = m.generated[-1]
        if self._forward is None or self._forward.rows != rows:
            self._forward = BatchRouting(
                self.engine, self.running, [m.row for m in self.running], rows
            )
        forward = self._forward
        steps, sampled = self._chunk()  # 0 steps: one step, sampled on the host
        sampling: list[SamplingParams | None] | None = None
        if sampled:
            sampling = [None] * rows
            for m in self.running:
                sampling[m.row] = m.request.sampling
        generator = self.sampler.generator
        graph = None
        if self.graphs is not None:
            graph = self.graphs.run(
                rows, forward.form(), ids, forward.fill, forward.collect, steps, sampling, generator
            )
        if graph is not None:
            logits, tokens, logprobs = graph.logits, graph.tokens, graph.logprobs
        else:
            kv.prepare_step(rows, full_width=False, steps=max(steps, 1))
            input_ids = torch.tensor(ids, device=engine.device).unsqueeze(1)  # [R, 1]

            def step() -> torch.Tensor:
                assert kv.positions is not None
                with forward.context():
                    out = engine.model(
                        input_ids=input_ids,
                        attention_mask=kv.step_mask(rows, kv.view[1]),
                        position_ids=kv.positions[:rows, None],
                        use_cache=True,
                        **{self.cache_kwarg: kv.cache},
                    )
                return out.logits[:, -1]

            logits = None
            tokens = torch.empty(steps, rows, dtype=torch.long, device=engine.device)
            logprobs = torch.empty(steps, rows, dtype=torch.float32, device=engine.device)
            if steps:
                noise = None
                if sampling is not None:
                    noise = RowSampling(steps, rows, engine.vocab_size, engine.device)
                    noise.fill(sampling, generator)
                decode_chunk(step, input_ids, kv, tokens, logprobs, noise)
            else:
                logits = step()
        kv.advance(order, max(steps, 1))
        self.steps += max(steps, 1)
        self.decodes += 1
        if steps:  # one read-back for the chunk (float64 holds every token id exactly)
            both = torch.stack((tokens.double(), logprobs.double())).tolist()  # [2, K, R]
            self._accept(
                self.running,
                [[int(t[m.row]) for t in both[0]] for m in self.running],
                [[lp[m.row] for lp in both[1]] for m in self.running],
            )
            return
        assert logits is not None
        if order != list(range(rows)):
            logits = logits.index_select(0, torch.tensor(order, device=logits.device))
        self._advance(self.running, logits)

    def _chunk(self) -> tuple[int, bool]:
        """(steps the next decode runs on the device, whether it samples); 0 steps: one step,
        sampled on the host (:class:`~.sampling.BatchSampler`). A chunk is always
        ``steps_per_sync`` long (one graph per rows bucket; see :mod:`.multi_step`)."""
        if self.steps_per_sync < 2:
            return 0, False
        params = [m.request.sampling for m in self.running]
        mode = chunk_mode(params, ensembles=any(m.mix is not None for m in self.running))
        if mode is None:
            return 0, False
        return self.steps_per_sync, mode == "sampled"

    def _advance(self, members: Sequence[Running], logits: torch.Tensor) -> None:
        """Sample one token per member from ``logits`` [R, V]; stream it; retire the done."""
        if any(m.mix is not None for m in members):
            rows, start = [], 0
            for m in members:
                part = logits[start : start + m.rows].float()
                if m.mix is not None:  # log sum_j w_j p_j
                    part = torch.logsumexp(torch.log_softmax(part, -1) + m.mix[:, None], 0)[None]
                rows.append(part)
                start += m.rows
            logits = torch.cat(rows)  # [Q, V]
        params = [m.request.sampling for m in members]
        seen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            for q, m in enumerate(members):
                seen[q, torch.tensor(m.prompt_ids + m.generated, device=logits.device)] = True
        tokens, logprobs = self.sampler.sample(logits, params, [m.generator for m in members], seen)
        # one read-back for both (float64 holds every token id exactly)
        token_list, logprob_list = torch.stack((tokens.double(), logprobs.double())).tolist()
        self._accept(members, [[int(t)] for t in token_list], [[lp] for lp in logprob_list])

    def _accept(
        self,
        members: Sequence[Running],
        tokens: list[list[int]],
        logprobs: list[list[float]],
    ) -> None:
        """Take each member's new ``tokens`` (one list per member, in order) up to the first
        that finishes it; stream the text as one delta per member; retire the done."""
        now = time.perf_counter()
        done: list[tuple[Running, str]] = []
        text = [""] * len(members)
        counts = [0] * len(members)
        active = list(range(len(members)))
        for step in range(len(tokens[0]) if tokens else 0):
            texts: list[int] = []
            for i in active:
                m, token = members[i], tokens[i][step]
                m.generated.append(token)
                m.logprob_sum += logprobs[i][step]
                if m.first_token_at is None:
                    m.first_token_at = now
                if token in self.eos_ids:
                    done.append((m, "stop"))
                else:
                    texts.append(i)
            self.tokens += len(active)
            deltas = add_tokens(
                [members[i].detokenizer for i in texts], [members[i].generated[-1] for i in texts]
            )
            active = []
            for i, delta in zip(texts, deltas, strict=True):
                m = members[i]
                if delta:
                    text[i] += delta
                    counts[i] += 1
                if m.detokenizer.stopped:
                    done.append((m, "stop"))
                elif len(m.generated) >= m.request.sampling.max_new_tokens:
                    done.append((m, "length"))
                else:
                    active.append(i)
        for m, delta, count in zip(members, text, counts, strict=True):
            if delta:
                m.request.sink(TextDelta(delta, count))
        for m, _ in done:
            tail = m.detokenizer.flush()
            if tail:
                m.request.sink(TextDelta(tail, 0))
        if done:
            self._retire([m for m, _ in done], reasons={id(m): r for m, r in done})

    def _retire(
        self,
        members: list[Running],
        reasons: dict[int, str] | None = None,
        cancelled: bool = False,
        error: BaseException | None = None,
    ) -> None:
        """Remove ``members`` from the batch, free their resources and send their last event."""
        if self._forward is not None:
            self._forward.flush_usage()
        self._forward = None
        leaving = {id(m) for m in members}
        for m in self.running:
            if id(m) in leaving:
                self.kv.release(m.row, m.rows)
        self.running = [m for m in self.running if id(m) not in leaving]
        now = time.perf_counter()
        for m in members:
            m.resources.close()
            request = m.request
            if cancelled:
                request.state = RequestState.CANCELLED
                continue
            if error is not None:
                request.state = RequestState.FAILED
                request.sink(GenerationFailed(error))
                continue
            request.state = RequestState.FINISHED
            count = len(m.generated)
            request.sink(
                GenerationFinished(
                    finish_reason=(reasons or {}).get(id(m), "length"),
                    prompt_tokens=len(m.prompt_ids),
                    completion_tokens=count,
                    experts=m.experts_used(),
                    confidence=math.exp(m.logprob_sum / count) if count else 0.0,
                    time_to_first_token_ms=((m.first_token_at or now) - request.created) * 1000.0,
                    latency_ms=(now - request.created) * 1000.0,
                )
            )


def iter_events(
    scheduler: GenerationScheduler, request_factory: Callable[..., GenerationRequest], **kwargs: Any
) -> Iterator[GenerationEvent]:
    """Submit one request built by ``request_factory(sink=..., **kwargs)`` and yield its events
    in this thread until the last one (for in-process callers, tests and benchmarks)."""
    import queue

    events: queue.Queue[GenerationEvent] = queue.Queue()
    request = request_factory(sink=events.put, **kwargs)
    scheduler.submit(request)
    try:
        while True:
            event = events.get()
            yield event
            if isinstance(event, (GenerationFinished, GenerationFailed)):
                return
    finally:
        request.cancel()
