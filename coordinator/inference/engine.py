"""Serve routed predictions: one frozen base model, many LoRA experts, one forward per batch.

The engine loads the base model and tokenizer once and injects a :class:`LoraBank` into its
target linear layers, so that every input of a batch can use its own experts in a single
forward pass (no ``set_adapter`` loop). Experts are loaded on demand into an
:class:`~.cache.ExpertCache` bounded in bytes. A :class:`~.plan.RoutingPlan` says per input
which experts serve it and how their contributions are combined (:mod:`.aggregation`):

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

Classification uses the encoder with its pooler (``AutoModel``); an expert's head is applied to
``pooler_output`` exactly as ``BertForSequenceClassification`` does in eval mode. For
``module_mix`` the head is the one of the expert with the largest total routing weight over
the input's tokens and modules. Causal LMs generate greedily from left-padded prompts.

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
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BatchEncoding

from moerge.coordinator.inference.aggregation import (
    EnsembleLogitsProcessor,
    ensemble_distributions,
    merge_heads,
    merge_lora_factors,
)
from moerge.coordinator.inference.cache import (
    RESERVED_PREFIX,
    ExpertCache,
    ExpertLoader,
    LoadedExpert,
    bank_module_name,
)
from moerge.coordinator.inference.errors import (
    EmptyBatch,
    InferenceInputError,
    InputTooLong,
    InvalidPlan,
    InvalidTopK,
)
from moerge.coordinator.inference.generation.scheduler import GenerationScheduler
from moerge.coordinator.inference.heads import ClassificationHead
from moerge.coordinator.inference.lora_bank import LoraBank
from moerge.coordinator.inference.plan import Aggregation, MergeOptions, RoutingPlan
from moerge.coordinator.inference.results import ExamplePrediction, ExpertWeight
from moerge.embedding import EMBEDDING_MAX_LENGTH, pooled_embeddings
from moerge.router_training.base import Router

TaskType = Literal["classification", "causal_lm"]
EnsembleMode = Literal["expand", "sequential"]
T = TypeVar("T")

DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class InferenceRequest:
    """One caller's inputs for :meth:`InferenceEngine.predict_many` (e.g. one Predict RPC)."""

    texts: Sequence[str]
    plan: RoutingPlan | None = None  # None: the active router with its defaults
    max_new_tokens: int | None = None  # causal LM only


class InferenceEngine:
    """Routed predictions over one base model (see the module docstring)."""

    def __init__(
        self,
        base_model_path: str | Path,
        task_type: TaskType = "classification",
        target_modules: Sequence[str] = ("query", "value"),
        max_rank: int = 16,
        cache_bytes: int = 256 << 20,
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
    ) -> None:
        if task_type not in ("classification", "causal_lm"):
            raise ValueError(f"task_type must be classification|causal_lm, got {task_type!r}")
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
        self.model.to(self.device).eval().requires_grad_(False)
        self.dtype = next(self.model.parameters()).dtype
        self.hidden_size = int(self.model.config.hidden_size)
        self.bank = LoraBank.inject(self.model, list(target_modules), max_rank, initial_capacity)
        self.cache = ExpertCache(
            self.bank,
            expert_loader,
            cache_bytes,
            classification=not self.is_causal_lm,
            hidden_size=self.hidden_size,
            device=self.device,
            dtype=self.dtype,
        )
        self._router = router
        self._worker: int | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="moerge-inference", initializer=self._mark_worker
        )
        self._temp_counter = 0
        self._closed = False
        self.generation_max_batch = int(generation_max_batch)
        self.generation_max_waiting = int(generation_max_waiting)
        self.generation_cuda_graphs = bool(generation_cuda_graphs)
        self._scheduler: GenerationScheduler | None = None

    # -- configuration (atomic swaps) ---------------------------------------------------------
    @property
    def is_causal_lm(self) -> bool:
        return self.task_type == "causal_lm"

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
        return self._call(self._embed, self._checked(texts))

    def route(
        self, texts: Sequence[str], plan: RoutingPlan | None = None
    ) -> list[tuple[ExpertWeight, ...]]:
        """The experts and weights each input would use, without running any expert.

        Token-level routers decide inside the forward pass, so for them the experts are those of
        a full :meth:`predict` (mean weight over tokens and modules).
        """
        return self._call(self._route, self._checked(texts), plan or RoutingPlan.routed())

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

    @property
    def scheduler(self) -> GenerationScheduler:
        """Continuous batching of streamed generation (causal LM; created on first use)."""
        if not self.is_causal_lm:
            raise InvalidPlan("streamed generation needs a causal-LM base model")
        if self._scheduler is None:
            self._scheduler = GenerationScheduler(
                self, self.generation_max_batch, self.generation_max_waiting,
                cuda_graphs=self.generation_cuda_graphs,
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
    def _checked(self, texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            raise InferenceInputError("inputs must be a list of strings, not one string")
        texts = list(texts)
        if not texts:
            raise EmptyBatch("no inputs given")
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
        enc = self.tokenizer(
            texts, padding=True, truncation=self.truncate,
            max_length=self.max_length if self.truncate else None, return_tensors="pt",
            # decoders take no segment ids (generate() refuses unused inputs)
            return_token_type_ids=False if self.is_causal_lm else None,
        )
        lengths = enc["attention_mask"].sum(dim=1)  # [B]
        too_long = (lengths > self.max_length).nonzero().flatten().tolist()
        if too_long:
            i = too_long[0]
            raise InputTooLong(
                f"input {i} has {int(lengths[i])} tokens; the limit is {self.max_length}"
            )
        return enc.to(self.device)

    # -- routing ------------------------------------------------------------------------------
    def embed_batch(self, texts: list[str]) -> torch.Tensor:
        """Routing embeddings [B, H] of ``texts`` in one pass (worker thread only)."""
        return self._embed(texts)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        with self.bank.no_routing():
            return pooled_embeddings(
                self.model, self.tokenizer, texts,
                batch_size=max(len(texts), 1), max_length=EMBEDDING_MAX_LENGTH,
            )

    def resolve_plan(
        self, texts: list[str], plan: RoutingPlan, embeddings: torch.Tensor | None = None
    ) -> RoutingPlan:
        """An explicit plan, or a routed one with its router bound (token-level).

        Example-level routers embed ``texts`` here, unless their ``embeddings`` [B, H] are given.
        Worker thread only."""
        if plan.is_explicit:
            plan.check_batch(len(texts))
            if plan.aggregation is Aggregation.MODULE_MIX:
                raise InvalidPlan("module mixing needs a token-level router, not fixed experts")
            return plan
        router = plan.router if plan.router is not None else self._router  # one read: atomic
        if router is None:
            raise InvalidPlan("no router is active and the plan names none")
        k = plan.top_k  # None: the router's own default (validated by the router)
        if k is not None and not 1 <= k <= router.num_experts:
            raise InvalidTopK(f"top_k must be between 1 and {router.num_experts}, got {k}")
        if router.granularity == "token":
            if plan.aggregation not in (None, Aggregation.MODULE_MIX):
                raise InvalidPlan(
                    f"router '{router.method}' routes tokens: only module_mix is possible, "
                    f"not {plan.aggregation.value}"
                )
            return RoutingPlan(Aggregation.MODULE_MIX, router=router, top_k=k, merge=plan.merge)
        aggregation = plan.aggregation or Aggregation.ENSEMBLE
        if aggregation is Aggregation.MODULE_MIX:
            raise InvalidPlan(f"router '{router.method}' routes examples: module_mix needs tokens")
        decision = router.route_examples(
            self._embed(texts) if embeddings is None else embeddings, k
        )
        if decision.k == 0:  # the ``base`` router: no expert at all
            return RoutingPlan(aggregation, expert_ids=((),) * len(texts),
                               weights=torch.empty(len(texts), 0), merge=plan.merge)
        return RoutingPlan.from_decision(router, decision, aggregation, plan.merge)

    def _route(self, texts: list[str], plan: RoutingPlan) -> list[tuple[ExpertWeight, ...]]:
        resolved = self.resolve_plan(texts, plan)
        if resolved.is_explicit:
            return [_expert_weights(ids, w) for ids, w in _rows(resolved)]
        return [p.experts for p in self._run_request(InferenceRequest(texts, resolved))]

    def _routes_examples(self, plan: RoutingPlan | None) -> bool:
        plan = plan or RoutingPlan.routed()
        router = plan.router if plan.router is not None else self._router
        return (
            not plan.is_explicit
            and router is not None
            and router.granularity == "example"
            and plan.aggregation is not Aggregation.MODULE_MIX
        )

    def _route_together(
        self, requests: list[InferenceRequest]
    ) -> list[InferenceRequest | BaseException]:
        """Route all example-level routed requests with one embedding pass over their texts.

        Their plans become explicit, so requests routed by different routers (e.g. each one
        restricted to other experts) share a batch key: one embedding pass and one forward per
        expert instead of both per router. A request that fails to route gets its error.
        """
        members = [i for i, r in enumerate(requests) if self._routes_examples(r.plan)]
        routed: list[InferenceRequest | BaseException] = list(requests)
        if len(members) < 2:
            return routed
        try:
            texts = {i: self._checked(requests[i].texts) for i in members}
            embeddings = self._embed([t for i in members for t in texts[i]])  # [sum B_i, H]
        except Exception:
            return routed  # each request meets its own error when run alone
        rows: dict[int, list[int]] = {}  # request -> its rows of ``embeddings``
        by_router: dict[tuple[object, ...], list[int]] = {}  # same router, top_k, aggregation
        offset = 0
        for i in members:
            rows[i] = list(range(offset, offset + len(texts[i])))
            offset += len(texts[i])
            plan = requests[i].plan or RoutingPlan.routed()
            by_router.setdefault(plan.batch_key(), []).append(i)
        for group in by_router.values():
            # one routing call per router; its requests share its settings, hence its errors
            plan = requests[group[0]].plan or RoutingPlan.routed()
            try:
                whole = self.resolve_plan(
                    [t for i in group for t in texts[i]], plan,
                    embeddings[[r for i in group for r in rows[i]]],
                )
            except Exception as exc:
                for i in group:
                    routed[i] = exc
                continue
            start = 0
            for i in group:
                part = whole.rows(range(start, start + len(rows[i])))
                routed[i] = replace(requests[i], plan=part)
                start += len(rows[i])
        return routed

    # -- request execution --------------------------------------------------------------------
    def _predict_many(
        self, requests: list[InferenceRequest]
    ) -> list[list[ExamplePrediction] | BaseException]:
        results: list[list[ExamplePrediction] | BaseException | None] = [None] * len(requests)
        groups: dict[tuple[object, ...], list[int]] = {}
        routed = self._route_together(requests)
        for i, request in enumerate(routed):
            if isinstance(request, BaseException):
                results[i] = request
                continue
            requests[i] = request
            try:
                texts = self._checked(request.texts)
                plan = request.plan or RoutingPlan.routed()
                plan.check_batch(len(texts))
            except Exception as exc:
                results[i] = exc
                continue
            key = (*plan.batch_key(), request.max_new_tokens)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            if len(members) == 1:
                results[members[0]] = self._run_isolated(requests[members[0]])
                continue
            texts = [t for i in members for t in requests[i].texts]
            plans = [requests[i].plan or RoutingPlan.routed() for i in members]
            first = plans[0]
            plan = RoutingPlan.concat(plans) if first.is_explicit else first
            try:
                merged = self._run_request(
                    InferenceRequest(texts, plan, requests[members[0]].max_new_tokens)
                )
            except Exception:
                for i in members:  # isolate the failing request(s)
                    results[i] = self._run_isolated(requests[i])
                continue
            start = 0
            for i in members:
                n = len(requests[i].texts)
                results[i] = merged[start : start + n]
                start += n
        return [r if r is not None else RuntimeError("request was not executed") for r in results]

    def _run_isolated(self, request: InferenceRequest) -> list[ExamplePrediction] | BaseException:
        try:
            return self._run_request(request)
        except Exception as exc:
            return exc

    def _run_request(self, request: InferenceRequest) -> list[ExamplePrediction]:
        start = time.perf_counter()
        texts = self._checked(request.texts)
        if request.max_new_tokens is not None and request.max_new_tokens < 1:
            raise InferenceInputError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        enc = self._encode(texts)
        plan = self.resolve_plan(texts, request.plan or RoutingPlan.routed())
        if self.is_causal_lm:
            predictions = self._generate(enc, plan, request.max_new_tokens or self.max_new_tokens)
        else:
            predictions = self._classify(enc, plan)
        latency_ms = (time.perf_counter() - start) * 1000.0
        return [replace(p, latency_ms=latency_ms) for p in predictions]

    # -- classification -----------------------------------------------------------------------
    def _pooled(self, enc: BatchEncoding) -> torch.Tensor:
        return self.model(**enc).pooler_output  # [B, H]

    def _classify(self, enc: BatchEncoding, plan: RoutingPlan) -> list[ExamplePrediction]:
        if plan.aggregation is Aggregation.MODULE_MIX:
            return self._classify_module_mix(enc, plan)
        if plan.k == 0:
            raise InvalidPlan("classification needs at least one expert (the base has no head)")
        with self.cache.acquire(_distinct(plan)) as experts:
            if plan.aggregation is Aggregation.ENSEMBLE:
                return self._classify_ensemble(enc, plan, experts)
            return self._classify_merged(enc, plan, experts)

    def _classify_ensemble(
        self, enc: BatchEncoding, plan: RoutingPlan, experts: dict[str, LoadedExpert]
    ) -> list[ExamplePrediction]:
        rows = list(_rows(plan))
        k = plan.k
        row_experts = [e for ids, _ in rows for e in ids]  # [B * k], input-major
        if k == 1 or self.ensemble_mode == "expand":
            slots = self._slots([[experts[e].slot] for e in row_experts])  # [B * k, 1]
            expanded = _repeat_rows(enc, k)
            with self.bank.route_examples(slots, torch.ones_like(slots, dtype=self.dtype)):
                pooled = self._pooled(expanded)  # [B * k, H]
        else:
            parts = []
            for j in range(k):
                slots = self._slots([[experts[ids[j]].slot] for ids, _ in rows])  # [B, 1]
                with self.bank.route_examples(slots, torch.ones_like(slots, dtype=self.dtype)):
                    parts.append(self._pooled(enc))  # [B, H]
            pooled = torch.stack(parts, dim=1).flatten(0, 1)  # [B * k, H]
        distributions = _through_heads(pooled, [_head(experts[e]) for e in row_experts])
        predictions = []
        for b, (ids, weights) in enumerate(rows):
            heads = [_head(experts[e]) for e in ids]
            result = ensemble_distributions(
                ids, weights, distributions[b * k : (b + 1) * k], heads
            )
            predictions.append(ExamplePrediction(
                output=result.label, confidence=result.confidence,
                experts=_expert_weights(result.expert_ids, result.weights),
                expert_outputs=result.expert_outputs, labels=result.labels,
                probabilities=result.probabilities, aggregation=Aggregation.ENSEMBLE.value,
                notes=result.notes,
            ))
        return predictions

    def _classify_merged(
        self, enc: BatchEncoding, plan: RoutingPlan, experts: dict[str, LoadedExpert]
    ) -> list[ExamplePrediction]:
        rows = list(_rows(plan))
        assert plan.aggregation is not None
        method = plan.aggregation.merge_method
        with self._merged_routing(rows, method, plan.merge, experts):
            pooled = self._pooled(enc)  # [B, H]
        # one head per distinct combination: merged like the adapters, or the top expert's
        by_key: dict[tuple[object, ...], ClassificationHead] = {}
        heads = []
        for ids, weights in rows:
            key = _combination_key(ids, weights)
            if key not in by_key:
                with _seeded(plan.merge.seed, key, "head", self.device):
                    by_key[key] = merge_heads(
                        [_head(experts[e]) for e in ids], _unit_l1(weights), method,
                        plan.merge.density, plan.merge.majority_sign_method,
                    )
            heads.append(by_key[key])
        predictions = []
        for (ids, weights), head, probs in zip(rows, heads, _through_heads(pooled, heads),
                                               strict=True):
            best = max(range(len(probs)), key=probs.__getitem__)
            predictions.append(ExamplePrediction(
                output=head.label_names[best], confidence=probs[best],
                experts=_expert_weights(ids, weights), labels=head.label_names,
                probabilities=tuple(probs), aggregation=plan.aggregation.value,
            ))
        return predictions

    @contextmanager
    def _merged_routing(
        self,
        rows: list[tuple[tuple[str, ...], list[float]]],
        method: str,
        merge: MergeOptions,
        experts: dict[str, LoadedExpert],
    ) -> Iterator[None]:
        """Route each row to its merged adapter for the forwards inside the block.

        ``linear``: the bank's example routing over the k slots (exact). Other methods: one
        temporary slot per distinct combination, removed on exit.
        """
        if method == "linear":
            slots = self._slots([[experts[e].slot for e in ids] for ids, _ in rows])  # [B, k]
            weights = torch.tensor([w for _, w in rows], dtype=self.dtype, device=self.device)
            with self.bank.route_examples(slots, weights):
                yield
            return
        temporary: list[str] = []
        slot_by_key: dict[tuple[object, ...], int] = {}
        factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        try:
            row_slots = []
            for ids, weights in rows:
                key = _combination_key(ids, weights)
                if key not in slot_by_key:
                    temp_id, slot_by_key[key] = self.add_merged_slot(
                        ids, weights, method, merge, experts, factors
                    )
                    temporary.append(temp_id)
                row_slots.append([slot_by_key[key]])
            slots = self._slots(row_slots)  # [B, 1]
            with self.bank.route_examples(slots, torch.ones_like(slots, dtype=self.dtype)):
                yield
        finally:
            for temp_id in temporary:
                self.bank.remove_expert(temp_id)

    def add_merged_slot(
        self,
        ids: Sequence[str],
        weights: Sequence[float],
        method: str,
        merge: MergeOptions,
        experts: dict[str, LoadedExpert],
        factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] | None = None,
    ) -> tuple[str, int]:
        """Write PEFT's ``method`` merge of ``ids`` into a temporary slot: (its id, its slot).

        The caller removes it with ``bank.remove_expert(id)``; ``factors`` caches experts'
        factors across calls. Worker thread only.
        """
        factors = {} if factors is None else factors
        for e in ids:
            if e not in factors:
                factors[e] = experts[e].factors(self.bank)
        key = _combination_key(ids, weights)
        with _seeded(merge.seed, key, "lora", self.device):
            merged = _merge_experts([factors[e] for e in ids], list(weights), method, merge)
        self._temp_counter += 1
        temp_id = f"{RESERVED_PREFIX}{self._temp_counter}"
        return temp_id, self.bank.add_expert(temp_id, merged)

    def _classify_module_mix(
        self, enc: BatchEncoding, plan: RoutingPlan
    ) -> list[ExamplePrediction]:
        router = plan.router
        assert router is not None
        with self.cache.acquire(router.expert_ids) as experts:
            with self._token_routing(router, plan.top_k, enc["attention_mask"], experts) as usage:
                pooled = self._pooled(enc)  # [B, H]
            means = [usage.mean_weights(b) for b in range(pooled.shape[0])]  # B x [E]
            tops = [router.expert_ids[int(torch.argmax(mean))] for mean in means]
            heads = [_head(experts[top]) for top in tops]
            predictions = []
            for mean, top, head, probs in zip(means, tops, heads, _through_heads(pooled, heads),
                                              strict=True):
                best = max(range(len(probs)), key=probs.__getitem__)
                predictions.append(ExamplePrediction(
                    output=head.label_names[best], confidence=probs[best],
                    experts=_expert_weights_from_usage(router.expert_ids, mean),
                    labels=head.label_names, probabilities=tuple(probs),
                    aggregation=Aggregation.MODULE_MIX.value,
                    notes=(f"head of {top} (largest total routing weight)",),
                ))
        return predictions

    @contextmanager
    def _token_routing(
        self,
        router: Router,
        top_k: int | None,
        attention_mask: torch.Tensor,
        experts: dict[str, LoadedExpert],
    ) -> Iterator[_TokenUsage]:
        """Token-level routing through ``router`` for the forwards inside the block."""
        slot_table = self._slots([[experts[e].slot] for e in router.expert_ids]).flatten()  # [E]
        names = self.router_modules(router)  # bank module -> the router's name for it
        usage = _TokenUsage(attention_mask, router.num_experts)

        def callback(module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n = hidden.shape[0]  # hidden [N, d_in]
            if module not in names:  # the router does not route here: base layer only
                none = torch.full((n, 1), -1, dtype=torch.long, device=hidden.device)
                return none, torch.zeros(n, 1, dtype=hidden.dtype, device=hidden.device)
            decision = router.route_tokens(names[module], hidden, top_k)
            usage.add(decision.to_dense(router.num_experts))
            return slot_table[decision.indices.to(slot_table.device)], decision.weights

        with self.bank.route_tokens(callback):
            yield usage

    def router_modules(self, router: Router) -> dict[str, str]:
        """Bank module name -> the token router's name for the same module (worker thread)."""
        bank_names = list(self.bank.modules)
        mapping = {}
        for name in router.modules:
            resolved = bank_module_name(bank_names, name)
            if resolved is not None:
                mapping[resolved] = name
        if not mapping:
            raise InvalidPlan(
                f"router '{router.method}' routes none of the engine's adapted modules "
                f"(router: {router.modules[:3]}..., engine: {bank_names[:3]}...)"
            )
        return mapping

    # -- generation ---------------------------------------------------------------------------
    def _generate(
        self, enc: BatchEncoding, plan: RoutingPlan, max_new_tokens: int
    ) -> list[ExamplePrediction]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": self.tokenizer.pad_token_id,
            "return_dict_in_generate": True,
            "output_scores": True,
        }
        batch = int(enc["input_ids"].shape[0])
        prompt_length = int(enc["input_ids"].shape[1])
        aggregation = plan.aggregation or Aggregation.ENSEMBLE
        if aggregation is Aggregation.MODULE_MIX:
            router = plan.router
            assert router is not None
            mask = enc["attention_mask"]
            with self.cache.acquire(router.expert_ids) as loaded, \
                    self._token_routing(router, plan.top_k, mask, loaded) as usage:
                out = self.model.generate(**enc, **kwargs)
            experts = [
                _expert_weights_from_usage(router.expert_ids, usage.mean_weights(b))
                for b in range(batch)
            ]
            return self._texts(out, batch, 1, prompt_length, experts, aggregation)
        rows = list(_rows(plan))
        experts_used = [_expert_weights(ids, w) for ids, w in rows]
        if plan.k == 0:
            with self.bank.no_routing():
                out = self.model.generate(**enc, **kwargs)
            return self._texts(out, batch, 1, prompt_length, experts_used, aggregation)
        with self.cache.acquire(_distinct(plan)) as experts:
            if aggregation is Aggregation.ENSEMBLE and plan.k > 1:
                k = plan.k
                slots = self._slots([[experts[e].slot] for ids, _ in rows for e in ids])
                processor = EnsembleLogitsProcessor(plan.weights.to(self.device))
                with self.bank.route_examples(slots, torch.ones_like(slots, dtype=self.dtype)):
                    out = self.model.generate(
                        **_repeat_rows(enc, k), logits_processor=[processor], **kwargs
                    )
                return self._texts(out, batch, k, prompt_length, experts_used, aggregation)
            method = "linear" if aggregation is Aggregation.ENSEMBLE else aggregation.merge_method
            with self._merged_routing(rows, method, plan.merge, experts):
                out = self.model.generate(**enc, **kwargs)
            return self._texts(out, batch, 1, prompt_length, experts_used, aggregation)

    def _texts(
        self,
        out: Any,
        batch: int,
        k: int,
        prompt_length: int,
        experts: list[tuple[ExpertWeight, ...]],
        aggregation: Aggregation,
    ) -> list[ExamplePrediction]:
        """Decode the first of each input's ``k`` rows; confidence = geometric mean token prob."""
        sequences = out.sequences[::k, prompt_length:]  # [B, new]
        logprobs = torch.stack(
            [torch.log_softmax(s.float(), dim=-1)[::k] for s in out.scores], dim=1
        )  # [B, new, V]
        chosen = logprobs.gather(-1, sequences[:, : logprobs.shape[1]].unsqueeze(-1))[..., 0]
        eos = self.tokenizer.eos_token_id
        predictions = []
        for b in range(batch):
            tokens = sequences[b].tolist()
            n = len(tokens)
            if eos is not None and eos in tokens:
                n = tokens.index(eos) + 1  # count the EOS, nothing after it
            mean = float(chosen[b, :n].mean()) if n else 0.0
            text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
            predictions.append(ExamplePrediction(
                output=text, confidence=float(torch.tensor(mean).exp()), experts=experts[b],
                aggregation=aggregation.value,
            ))
        return predictions

    # -- helpers ------------------------------------------------------------------------------
    def _slots(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)


class _TokenUsage:
    """Per input, the routing weight each expert received over non-padding tokens and modules."""

    def __init__(self, attention_mask: torch.Tensor, num_experts: int) -> None:
        self.mask = attention_mask.float()  # [B, T] of the first forward (the prompt)
        self.totals = self.mask.new_zeros(attention_mask.shape[0], num_experts)  # [B, E]

    def add(self, dense: torch.Tensor) -> None:
        """``dense`` [N, E] routing weights of one module call, N = B * T tokens."""
        batch, length = self.mask.shape
        dense = dense.to(self.totals)
        if dense.shape[0] == batch * length:
            dense = dense.view(batch, length, -1) * self.mask.unsqueeze(-1)
        elif dense.shape[0] % batch == 0:  # a decoding step: every new token is real
            dense = dense.view(batch, dense.shape[0] // batch, -1)
        else:
            return
        self.totals += dense.sum(dim=1)

    def mean_weights(self, b: int) -> torch.Tensor:
        """Expert weights of input ``b`` averaged over its tokens and modules: [E], sums to 1."""
        row = self.totals[b].cpu()
        total = row.sum()
        return row / total if total > 0 else row


def _through_heads(pooled: torch.Tensor, heads: list[ClassificationHead]) -> list[list[float]]:
    """Row ``b`` of ``pooled`` [B, H] through ``heads[b]`` -> B probability lists.

    One matmul per distinct head object and a single device-to-host copy.
    """
    groups: dict[int, list[int]] = {}
    for b, head in enumerate(heads):
        groups.setdefault(id(head), []).append(b)
    parts, layout = [], []
    for index in groups.values():
        head = heads[index[0]]
        rows = pooled[torch.tensor(index, device=pooled.device)]  # [n, H]
        parts.append(torch.softmax(head.logits(rows), dim=-1).flatten())  # [n * L]
        layout.append((index, head.num_labels))
    flat = torch.cat(parts).cpu().tolist()
    out: list[list[float]] = [[] for _ in heads]
    position = 0
    for index, labels in layout:
        for b in index:
            out[b] = flat[position : position + labels]
            position += labels
    return out


def _rows(plan: RoutingPlan) -> Iterator[tuple[tuple[str, ...], list[float]]]:
    assert plan.expert_ids is not None and plan.weights is not None
    yield from zip(plan.expert_ids, plan.weights.tolist(), strict=True)


def _distinct(plan: RoutingPlan) -> list[str]:
    return list(dict.fromkeys(e for ids in plan.expert_ids or () for e in ids))


def _unit_l1(weights: Sequence[float]) -> list[float]:
    """Head merge weights: ``w_j / sum_i |w_i|``.

    Routed weights already sum to 1, so this changes nothing for them. A few-shot composition's
    signed weights scale the LoRA deltas as given (LoraHub), but a head is a whole layer, not a
    delta: scaled with them, shrinking every weight towards 0 would shrink the logits towards a
    uniform answer, which the search would learn to prefer on confidently wrong experts.
    """
    total = sum(abs(float(w)) for w in weights)
    return [float(w) / total for w in weights] if total > 0 else [float(w) for w in weights]


def _head(expert: LoadedExpert) -> ClassificationHead:
    if expert.head is None:
        raise InvalidPlan(f"expert {expert.expert_id!r} has no classification head")
    return expert.head


def _expert_weights(ids: Sequence[str], weights: Sequence[float]) -> tuple[ExpertWeight, ...]:
    return tuple(ExpertWeight(e, float(w)) for e, w in zip(ids, weights, strict=True))


def _expert_weights_from_usage(
    expert_ids: Sequence[str], mean: torch.Tensor
) -> tuple[ExpertWeight, ...]:
    order = torch.argsort(mean, descending=True).tolist()
    return tuple(ExpertWeight(expert_ids[i], float(mean[i])) for i in order if mean[i] > 0)


def _repeat_rows(enc: BatchEncoding, k: int) -> BatchEncoding:
    """Each row ``k`` times, input-major: rows ``b*k .. b*k+k-1`` are copies of input b."""
    if k == 1:
        return enc
    return BatchEncoding({key: value.repeat_interleave(k, dim=0) for key, value in enc.items()})


def _combination_key(ids: Sequence[str], weights: Sequence[float]) -> tuple[object, ...]:
    return (*ids, *(round(float(w), 6) for w in weights))


@contextmanager
def _seeded(
    seed: int, key: tuple[object, ...], salt: str, device: torch.device
) -> Iterator[None]:
    """Seed torch's RNGs from (seed, combination) so DARE does not depend on batching."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(zlib.crc32(repr((seed, key, salt)).encode()))
        yield


def _merge_experts(
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]],
    weights: list[float],
    method: str,
    merge: MergeOptions,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """One merged adapter per module of any chosen expert (PEFT ``add_weighted_adapter``).

    ``factors[j]``: expert j's ``module -> (A, B, scaling)``; an expert that does not adapt a
    module takes no part in that module's merge, as in PEFT.
    """
    merged = {}
    for module in dict.fromkeys(m for f in factors for m in f):
        present = [(f[module], w) for f, w in zip(factors, weights, strict=True) if module in f]
        merged[module] = merge_lora_factors(
            [p for p, _ in present], [w for _, w in present], method,
            merge.density, merge.majority_sign_method,
        )
    return merged
