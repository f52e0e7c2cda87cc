"""Serve routed predictions: one frozen base model, many LoRA experts, one forward per batch.

The engine loads the base model and tokenizer once and injects a :class:`LoraBank` into its
target linear layers, so that every input of a batch can use its own experts in a single
forward pass (no ``set_adapter`` loop). Experts are loaded on demand into an
:class:`~.cache.ExpertCache` bounded in bytes. A :class:`~.plan.RoutingPlan` says per input
which experts serve it and how their contributions are combined. A request runs in four steps,
one module each:

==================  ==========================================================================
step                module
==================  ==========================================================================
check and encode    this one: texts checked (:meth:`InferenceEngine.check_texts`), tokenized
plan                :mod:`.planning`: a routed plan resolved with its router (embedding the
                    texts for example-level routers) into an explicit or token-level plan
forward             :mod:`.forward`: the bank routed per row or per token around each forward;
                    :mod:`.merging`: per-input merges (TIES/DARE) in temporary bank slots
classify/generate   :mod:`.classify` (heads on the pooled output, combined by aggregation) or
                    :mod:`.generate` (greedy decoding); streamed generation: :mod:`.generation`
==================  ==========================================================================

=====================  ==========================================================================
aggregation            execution
=====================  ==========================================================================
``ensemble``           classification: one forward over the batch expanded by k (row
                       ``b*k+j`` uses expert j of input b; ``ensemble_mode="expand"``, the
                       default on GPUs) or k forwards of the batch (``"sequential"``, the
                       default on CPU, where it measured faster), each expert's head on its
                       rows; generation: the expanded batch, greedy decoding on the weighted
                       mixture of next-token distributions
``merge_linear``       one forward; the bank adds ``sum_j w_j B_j A_j`` per input (exact)
``merge_ties`` /       per distinct (experts, weights) combination of the batch, PEFT's merge of
``merge_dare_*``       the LoRA factors is written into a temporary bank slot (freed after the
                       batch, outside the cache budget); one forward
``module_mix``         a token-level router picks experts per token inside each adapted module
                       (``LoraBank.route_tokens``)
=====================  ==========================================================================

Threading model: every piece of model work (embedding, forwards, generation, loading, evicting
and replacing experts, temporary merge slots) runs on the engine's single worker thread, in
submission order, so a batch never observes a half-applied change. Public methods may be called
from any thread; they queue onto the worker and wait. The active router and the expert loader
are plain attributes replaced by atomic reference assignment: a batch reads them once when it
starts and finishes with what it read, later batches see the new ones. Replacing an expert
(:meth:`InferenceEngine.add_expert`) is queued behind running batches, which therefore finish
with the old version. No restart, and no in-flight request fails because of a swap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BatchEncoding

from moerge.coordinator.config import (
    DEFAULT_ADAPTER_CACHE_BYTES,
    DEFAULT_CUDA_STEPS_PER_SYNC,
    DEFAULT_MAX_NEW_TOKENS,
)
from moerge.coordinator.inference.answer_scoring import AnswerScorer
from moerge.coordinator.inference.cache import ExpertCache, ExpertLoader, LoadedExpert
from moerge.coordinator.inference.classify import Classifier, EnsembleMode
from moerge.coordinator.inference.encoding import (
    SharedEncoding,
    check_lengths,
    embeddings_of,
    tokenise,
)
from moerge.coordinator.inference.errors import (
    EmptyBatch,
    InferenceInputError,
    InputTooLong,
    InvalidPlan,
)
from moerge.coordinator.inference.forward import Forward
from moerge.coordinator.inference.generate import Generator
from moerge.coordinator.inference.generation.scheduler import GenerationScheduler
from moerge.coordinator.inference.lora_bank import LoraBank
from moerge.coordinator.inference.merging import FactorCache, MergedSlots
from moerge.coordinator.inference.plan import InferenceRequest, MergeOptions, RoutingPlan
from moerge.coordinator.inference.planning import resolve_plan, route_together
from moerge.coordinator.inference.results import ExamplePrediction, ExpertWeight, expert_weights
from moerge.coordinator.inference.traced import TracedForwards
from moerge.embedding import EMBEDDING_MAX_LENGTH
from moerge.router_training.base import Router

#: What callers import from here; ``InferenceRequest`` lives in :mod:`.plan`, beside the plan.
__all__ = ["InferenceEngine", "InferenceRequest", "TaskType", "checked_task_type"]

TaskType = Literal["classification", "causal_lm"]
T = TypeVar("T")


def checked_task_type(task_type: str) -> TaskType:
    """``task_type`` as a :data:`TaskType` (settings hold it as a string); ``ValueError`` if it
    names neither."""
    match task_type:
        case "classification" | "causal_lm":
            return task_type
    raise ValueError(f"task_type must be classification|causal_lm, got {task_type!r}")


class InferenceEngine:
    """Routed predictions over one base model (see the module docstring).

    ``cache_bytes`` bounds the experts' LoRA weights kept resident (the coordinator's
    ``adapter_cache_bytes``, same default); ``max_chars`` and ``max_length`` bound an input in
    characters and tokens; ``max_new_tokens`` is the default answer length of a causal LM.
    ``traced_forwards`` (classification) runs the one-expert-per-row and routing-embedding
    forwards as TorchScript graphs (:mod:`.traced`).
    """

    def __init__(
        self,
        base_model_path: str | Path,
        task_type: TaskType = "classification",
        target_modules: Sequence[str] = ("query", "value"),
        max_rank: int = 16,
        cache_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES,
        device: str | torch.device = "cpu",
        max_length: int = 128,
        *,
        expert_loader: ExpertLoader | None = None,
        router: Router | None = None,
        dtype: torch.dtype | None = None,
        max_chars: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        truncate: bool = False,
        ensemble_mode: EnsembleMode | None = None,
        initial_capacity: int = 8,
        generation_max_batch: int = 32,
        generation_max_waiting: int = 256,
        generation_cuda_graphs: bool = True,
        generation_steps_per_sync: int = 0,
        generation_bgmv_kernels: bool = True,
        generation_fused_rotary: bool = True,
        traced_forwards: bool = False,
    ) -> None:
        task_type = checked_task_type(task_type)
        if ensemble_mode not in (None, "expand", "sequential"):
            raise ValueError(f"ensemble_mode must be expand|sequential, got {ensemble_mode!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.task_type: TaskType = task_type
        self.device = torch.device(device)
        self.max_length = int(max_length)
        #: classification: keep the first ``max_length`` tokens (as training did) instead of
        #: refusing longer inputs; prompts of a causal LM are never truncated
        self.truncate = bool(truncate) and task_type == "classification"
        self.max_chars = max_chars
        self.max_new_tokens = int(max_new_tokens)
        # k forwards measured faster than one forward over the k-times larger batch on CPU
        # (benchmarks/results/inference_throughput.md); GPUs favour the larger batch
        self.ensemble_mode: EnsembleMode = ensemble_mode or (
            "sequential" if self.device.type == "cpu" else "expand"
        )
        path = str(base_model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.is_causal_lm:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        else:
            self.model = AutoModel.from_pretrained(path, dtype=dtype)
            if getattr(self.model, "pooler", None) is None:
                raise ValueError(
                    f"{path}: classification needs an encoder with a pooler (BERT family)"
                )
        # through nn.Module's signature: PreTrainedModel.to is wrapped with functools.wraps, whose
        # typeshed stub does not bind self (the call still runs PreTrainedModel.to)
        module: torch.nn.Module = self.model
        module.to(self.device).eval().requires_grad_(False)
        self.dtype = next(self.model.parameters()).dtype
        self.hidden_size = int(self.model.config.hidden_size)
        self.bank = LoraBank.inject(self.model, list(target_modules), max_rank, initial_capacity)
        self.bank.bgmv_kernels = bool(generation_bgmv_kernels)
        self.cache = ExpertCache(
            self.bank,
            expert_loader,
            cache_bytes,
            classification=not self.is_causal_lm,
            hidden_size=self.hidden_size,
            device=self.device,
            dtype=self.dtype,
        )
        self.forward = Forward(self.model, self.bank, self.device, self.dtype)
        if traced_forwards and not self.is_causal_lm:
            self.forward.traced = TracedForwards(self.model, self.bank)
        self.merges = MergedSlots(self.forward)
        self.classifier = Classifier(self.forward, self.cache, self.merges)
        self.generator = Generator(self.forward, self.cache, self.merges, self.tokenizer)
        self.answer_scorer = AnswerScorer(self.generator)
        self._router = router
        self._worker: int | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="moerge-inference", initializer=self._mark_worker
        )
        self._closed = False
        self.generation_max_batch = int(generation_max_batch)
        self.generation_max_waiting = int(generation_max_waiting)
        self.generation_cuda_graphs = bool(generation_cuda_graphs)
        #: CUDA: RoPE as one Liger-Kernel kernel per layer (:mod:`.generation.fused_rope`)
        self.generation_fused_rotary = bool(generation_fused_rotary)
        if generation_steps_per_sync < 0:
            raise ValueError(
                f"generation_steps_per_sync must be >= 0 (0: auto), got {generation_steps_per_sync}"
            )
        #: decode steps per host round trip (0, auto: 8 on CUDA, 1 elsewhere)
        self.generation_steps_per_sync = generation_steps_per_sync or (
            DEFAULT_CUDA_STEPS_PER_SYNC if self.device.type == "cuda" else 1
        )
        self._scheduler: GenerationScheduler | None = None

    # -- configuration (atomic swaps) ---------------------------------------------------------
    @property
    def is_causal_lm(self) -> bool:
        """Whether the base model generates text (else it classifies)."""
        return self.task_type == "causal_lm"

    @property
    def vocab_size(self) -> int:
        """Columns of the causal LM's logits (the output embedding's rows)."""
        head = self.model.get_output_embeddings()
        if head is not None and hasattr(head, "weight"):
            return int(head.weight.shape[0])
        return int(self.model.config.vocab_size)

    @property
    def router(self) -> Router | None:
        """The active router, used by plans that name none."""
        return self._router

    def set_router(self, router: Router | None) -> None:
        """Swap the active router (atomic; running batches finish with the previous one)."""
        self._router = router

    def set_expert_loader(self, loader: ExpertLoader | None) -> None:
        """Swap the function that resolves expert ids to folders (atomic)."""
        self.cache.loader = loader

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The worker (one thread) running all model work; batchers may run on it directly."""
        return self._executor

    # -- experts ------------------------------------------------------------------------------
    def add_expert(self, expert_id: str, folder: str | Path | None = None) -> None:
        """Load (or replace) an expert now, from ``folder`` or the loader; queued behind batches."""
        self._call(self.cache.put, expert_id, folder)

    def remove_expert(self, expert_id: str) -> bool:
        """Evict an expert now (a later use reloads it through the loader)."""
        return self._call(self.cache.invalidate, expert_id)

    # -- public entry points ------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Routing embeddings of ``texts``: frozen base model, no experts -> float32 [B, H]."""
        return self._call(self._embed, self.check_texts(texts))

    def route(
        self, texts: Sequence[str], plan: RoutingPlan | None = None
    ) -> list[tuple[ExpertWeight, ...]]:
        """The experts and weights each input would use, without running any expert.

        Token-level routers decide inside the forward pass, so for them the experts are those of
        a full :meth:`predict` (mean weight over tokens and modules).
        """
        return self._call(self._route, self.check_texts(texts), plan or RoutingPlan.routed())

    def predict(
        self,
        texts: Sequence[str],
        plan: RoutingPlan | None = None,
        max_new_tokens: int | None = None,
    ) -> list[ExamplePrediction]:
        """Routed predictions, one per text (causal LM: generated text, see :meth:`generate`)."""
        request = InferenceRequest(texts, plan, max_new_tokens)
        return self._call(self._run_request, request)

    def generate(
        self,
        texts: Sequence[str],
        plan: RoutingPlan | None = None,
        max_new_tokens: int | None = None,
    ) -> list[ExamplePrediction]:
        """Greedy generation with routed experts (causal LM; routing decided on the prompt)."""
        if not self.is_causal_lm:
            raise InvalidPlan("generate needs a causal LM engine")
        return self.predict(texts, plan, max_new_tokens)

    def answer_losses(
        self, prompts: Sequence[str], answers: Sequence[str], plan: RoutingPlan | None = None
    ) -> list[float]:
        """Mean negative log-likelihood of each answer after its prompt under ``plan`` (causal
        LM; nats per answer token, EOS included; see :mod:`.answer_scoring`)."""
        if not self.is_causal_lm:
            raise InvalidPlan("scoring answers needs a causal LM engine")
        if isinstance(answers, str) or len(answers) != len(prompts):
            raise InferenceInputError("give one answer per prompt")
        return self._call(self._answer_losses, self.check_texts(prompts), list(answers), plan)

    def _answer_losses(
        self, prompts: list[str], answers: list[str], plan: RoutingPlan | None
    ) -> list[float]:
        self._encode(prompts)  # the prompts' lengths are checked as a request's would be
        resolved = resolve_plan(prompts, plan or RoutingPlan.routed(), self._router, self._embed)
        return self.answer_scorer(prompts, answers, resolved)

    @property
    def scheduler(self) -> GenerationScheduler:
        """Continuous batching of streamed generation (causal LM; created on first use)."""
        if not self.is_causal_lm:
            raise InvalidPlan("streamed generation needs a causal-LM base model")
        if self._scheduler is None:
            self._scheduler = GenerationScheduler(
                self,
                self.generation_max_batch,
                self.generation_max_waiting,
                cuda_graphs=self.generation_cuda_graphs,
                steps_per_sync=self.generation_steps_per_sync,
            )
        return self._scheduler

    def predict_many(
        self, requests: Sequence[InferenceRequest]
    ) -> list[list[ExamplePrediction] | BaseException]:
        """Serve several callers' requests, batching compatible ones into one engine pass.

        Requests with the same :meth:`RoutingPlan.batch_key` (and ``max_new_tokens``) are
        concatenated. Each caller gets its predictions or the exception its request raised: if
        a combined pass fails, its requests are retried one by one so one bad request does not
        fail the others.
        """
        return self._call(self._predict_many, list(requests))

    def close(self) -> None:
        """Finish queued work and stop the worker thread."""
        self._closed = True
        self._executor.shutdown(wait=True)

    # -- worker-thread plumbing ---------------------------------------------------------------
    def _mark_worker(self) -> None:
        self._worker = threading.get_ident()

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the worker thread (directly when already on it) and return its result."""
        if threading.get_ident() == self._worker:
            with torch.no_grad():
                return fn(*args)
        if self._closed:
            raise RuntimeError("the inference engine is closed")
        return self._executor.submit(self._call, fn, *args).result()

    # -- input checks -------------------------------------------------------------------------
    def check_texts(self, texts: Sequence[str]) -> list[str]:
        """``texts`` as a list, or the caller's mistake as an :class:`InferenceInputError`.

        The one place inputs are checked (with :meth:`_encode` for their length in tokens,
        :func:`.planning.resolve_plan` for ``top_k`` and :meth:`_run` for ``max_new_tokens``),
        once per request: the engine also serves in-process callers that bypass
        ``InferenceService`` (the composition search, benchmarks, tests), so the checks live
        here and the service adds only what the engine cannot know (how many inputs one RPC
        may carry). Callers may run it early to refuse a request before other work.
        """
        if isinstance(texts, str):
            raise InferenceInputError("inputs must be a list of strings, not one string")
        texts = list(texts)
        if not texts:
            raise EmptyBatch("inputs is empty: no texts given")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InferenceInputError(f"input {i} is not a string")
            if self.max_chars is not None and len(text) > self.max_chars:
                raise InputTooLong(
                    f"input {i} has {len(text)} characters; the limit is {self.max_chars}"
                )
        return texts

    def _encode(self, texts: list[str]) -> BatchEncoding:
        """Tokenize with padding; inputs over ``max_length`` tokens are refused (or truncated)."""
        enc = self._tokenise(texts)
        check_lengths(enc, self.max_length)
        return enc

    def _tokenise(self, texts: list[str]) -> BatchEncoding:
        """The engine's tokenisation of ``texts`` on its device, lengths not checked."""
        max_length = self.max_length if self.truncate else None
        return tokenise(self.tokenizer, texts, max_length, self.is_causal_lm).to(self.device)

    def _shared_encoding(self, texts: list[str]) -> SharedEncoding | None:
        """One tokenisation of a batch's ``texts`` for routing and forwards (None: failed)."""
        distinct = list(dict.fromkeys(texts))
        try:
            enc = self._tokenise(distinct)
        except Exception:
            return None  # each group meets its own error when it tokenises alone
        truncated_at = self.max_length if self.truncate else None
        return SharedEncoding(enc, distinct, truncated_at, self._embed_encoded, self._embed)

    # -- routing ------------------------------------------------------------------------------
    def embed_batch(self, texts: list[str]) -> torch.Tensor:
        """Routing embeddings [B, H] of ``texts`` in one pass (worker thread only)."""
        return self._embed(texts)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """:func:`moerge.embedding.pooled_embeddings` of ``texts`` in one pass."""
        if not texts:
            return torch.empty(0, self.hidden_size)
        causal = self.is_causal_lm
        enc = tokenise(self.tokenizer, texts, EMBEDDING_MAX_LENGTH, causal).to(self.device)
        return self._embed_encoded(enc)

    def _embed_encoded(self, enc: BatchEncoding) -> torch.Tensor:
        """Routing embeddings [B, H] of tokenised rows: the base model alone, no expert."""
        traced = self.forward.traced
        embeddings = traced.embeddings(enc) if traced is not None else None
        if embeddings is not None:
            return embeddings
        with self.bank.no_routing():
            return embeddings_of(self.model, enc, self.is_causal_lm)

    def resolve_plan(
        self, texts: list[str], plan: RoutingPlan, embeddings: torch.Tensor | None = None
    ) -> RoutingPlan:
        """:func:`.planning.resolve_plan` with the active router (one read: atomic).

        Example-level routers embed ``texts`` here, unless their ``embeddings`` [B, H] are given.
        Worker thread only."""
        return resolve_plan(texts, plan, self._router, self._embed, embeddings)

    def router_modules(self, router: Router) -> dict[str, str]:
        """Bank module name -> the token router's name for the same module (worker thread)."""
        return self.forward.router_modules(router)

    def add_merged_slot(
        self,
        ids: Sequence[str],
        weights: Sequence[float],
        method: str,
        merge: MergeOptions,
        experts: dict[str, LoadedExpert],
        factors: FactorCache | None = None,
    ) -> tuple[str, int]:
        """PEFT's ``method`` merge of ``ids`` in a temporary bank slot: (its id, its slot).

        :meth:`.merging.MergedSlots.add`; the caller removes it with ``bank.remove_expert(id)``.
        Worker thread only.
        """
        return self.merges.add(ids, weights, method, merge, experts, factors)

    def _route(self, texts: list[str], plan: RoutingPlan) -> list[tuple[ExpertWeight, ...]]:
        resolved = self.resolve_plan(texts, plan)
        if resolved.is_explicit:
            return [expert_weights(ids, w) for ids, w in resolved.expert_rows()]
        return [p.experts for p in self._run(texts, resolved, None)]

    # -- request execution --------------------------------------------------------------------
    def _predict_many(
        self, requests: list[InferenceRequest]
    ) -> list[list[ExamplePrediction] | BaseException]:
        checked: list[InferenceRequest | BaseException] = []
        for request in requests:
            try:
                checked.append(replace(request, texts=self.check_texts(request.texts)))
            except Exception as exc:
                checked.append(exc)
        # one tokenisation for the routing embedding and every group's forward
        shared = self._shared_encoding(
            [t for r in checked if isinstance(r, InferenceRequest) for t in r.texts]
        )
        embed = shared.embed if shared is not None else self._embed
        routed = route_together(checked, self._router, embed)
        results: list[list[ExamplePrediction] | BaseException | None] = [None] * len(requests)
        runnable: dict[int, InferenceRequest] = {}
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, routed_request in enumerate(routed):
            if isinstance(routed_request, BaseException):
                results[i] = routed_request
                continue
            plan = routed_request.plan or RoutingPlan.routed()
            try:
                plan.check_batch(len(routed_request.texts))
            except Exception as exc:
                results[i] = exc
                continue
            runnable[i] = routed_request
            key = (*plan.batch_key(), routed_request.max_new_tokens)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            if len(members) == 1:
                results[members[0]] = self._run_isolated(runnable[members[0]], shared)
                continue
            texts = [t for i in members for t in runnable[i].texts]
            plans = [runnable[i].plan or RoutingPlan.routed() for i in members]
            first = plans[0]
            plan = RoutingPlan.concat(plans) if first.is_explicit else first
            try:
                merged = self._run(texts, plan, runnable[members[0]].max_new_tokens, shared)
            except Exception:
                for i in members:  # isolate the failing request(s)
                    results[i] = self._run_isolated(runnable[i], shared)
                continue
            start = 0
            for i in members:
                n = len(runnable[i].texts)
                results[i] = merged[start : start + n]
                start += n
        return [r if r is not None else RuntimeError("request was not executed") for r in results]

    def _run_isolated(
        self, request: InferenceRequest, shared: SharedEncoding | None = None
    ) -> list[ExamplePrediction] | BaseException:
        """:meth:`_run` of one request whose texts are checked; its error instead of raising."""
        try:
            return self._run(list(request.texts), request.plan, request.max_new_tokens, shared)
        except Exception as exc:
            return exc

    def _run_request(self, request: InferenceRequest) -> list[ExamplePrediction]:
        return self._run(self.check_texts(request.texts), request.plan, request.max_new_tokens)

    def _run(
        self,
        texts: list[str],
        plan: RoutingPlan | None,
        max_new_tokens: int | None,
        shared: SharedEncoding | None = None,
    ) -> list[ExamplePrediction]:
        """Encode (or take the rows of ``shared``), resolve the plan, classify or generate;
        ``texts`` checked already."""
        start = time.perf_counter()
        if max_new_tokens is not None and max_new_tokens < 1:
            raise InferenceInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        enc = shared.of(texts) if shared is not None else None
        if enc is None:
            enc = self._encode(texts)
        else:
            check_lengths(enc, self.max_length)
        embed = shared.embed if shared is not None else self._embed
        plan = resolve_plan(texts, plan or RoutingPlan.routed(), self._router, embed)
        if self.is_causal_lm:
            predictions = self.generator(enc, plan, max_new_tokens or self.max_new_tokens)
        else:
            predictions = self.classifier(enc, plan, self.ensemble_mode)
        latency_ms = (time.perf_counter() - start) * 1000.0
        return [replace(p, latency_ms=latency_ms) for p in predictions]
