"""CUDA graphs of the decode step: capture once per batch shape, replay every step.

A decode step of a 1.1B model at 32 rows is a few milliseconds of GPU work but over a thousand
kernel launches (22 layers x attention, MLP, norms, the LoRA bank in 88 modules, a token
router's scoring and top-k in each); launched one by one from Python the step is bound by the
host (73.5 ms measured on an H100 against a 0.75 ms floor of reading the weights). A CUDA graph
records those launches once and replays them with one call, as vLLM and TGI do for decoding.

A graph replays fixed kernels on fixed memory, so everything a step reads is a *static buffer*
updated in place before the replay: the input token ids, the rows' positions (in
:class:`~.kv_rows.KVRows`), and the routing, which takes one of two data-only forms:

* **example routing** (every row one expert, a linear merge, a temporary merged slot or the base
  model): slots and weights [R, k] buffers, read by :meth:`LoraBank.route_examples`;
* **token routing** by one router for every row (*step-level* routing): the router's tables
  are fixed tensors, the router-expert -> bank-slot table is an [E] buffer, and the routing
  weights each row received in this step accumulate into a [R, E] buffer.

A graph returns the step's logits (the host samples), or, when no running request needs the
host between steps, holds ``K`` steps with each step's choice (greedy, or sampled from noise
drawn before the chunk) fed back on the device and returns their tokens (:mod:`.multi_step`). A
graph is keyed by that form, the steps, whether it samples, the rows bucket (1, 2, 4, ... up to
the batch limit: a step pads the rows in use up to the next bucket), the KV capacity and the
bank's buffers; a change of any
of them (a new router object, the KV buffers or the bank grown) captures a new graph. Batches
mixing both forms, or several token routers, run eagerly; so does token routing where the bank's
token mixing reads back to the host (float32: only the fused half-precision kernel does not). A
capture that fails (an operation that reads back, say) is logged once and that key runs eagerly
from then on.

A capture takes most of a second for a 1.1B model, and every request of the batch waits for it.
So the worker also captures while idle (:meth:`DecodeGraphs.capture_missing`): the buckets, up
to the widest batch so far, of the two most recent (form, steps, sampled) families, one graph
per turn. Captures run one at a time in the process, in CUDA's ``thread_local`` mode, so that
another thread's synchronising call neither fails nor invalidates them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moerge.coordinator.inference.generation.multi_step import RowSampling, decode_chunk
from moerge.coordinator.inference.mixing import token_mixing_without_host_sync

if TYPE_CHECKING:
    from moerge.coordinator.inference.engine import InferenceEngine
    from moerge.coordinator.inference.generation.kv_rows import KVRows
    from moerge.coordinator.inference.generation.sampling import SamplingParams
    from moerge.router_training.base import Router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExampleForm:
    """Every row routed per example, ``width`` (slot, weight) pairs per row."""

    width: int


@dataclass(frozen=True)
class TokenForm:
    """Every row routed per token by ``router`` (compared by identity) with ``top_k``."""

    router: Router
    top_k: int | None

    def __hash__(self) -> int:
        return hash((id(self.router), self.top_k))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TokenForm)
            and other.router is self.router
            and other.top_k == self.top_k
        )


RoutingForm = ExampleForm | TokenForm

#: routing forms (with steps and sampling) whose every rows bucket idle time captures
PRECAPTURED_FAMILIES = 2

#: One capture at a time in the process. Entering a capture synchronises the whole device,
#: which fails while another thread captures (two engines in one process, seen on an H100
#: when one engine captured while idle and the other started decoding) and breaks that capture.
_CAPTURING = threading.Lock()


def describe(form: RoutingForm) -> str:
    """A routing form in a log line (a token router by its class, not its tables)."""
    if isinstance(form, ExampleForm):
        return f"example routing of width {form.width}"
    return f"token routing by {type(form.router).__name__} (top-{form.top_k})"


class _Graph:
    """One captured decode step (``steps`` 0: it returns logits) or chunk of ``steps`` steps
    (greedy, or ``sampled``), and the static buffers it reads and writes."""

    def __init__(
        self,
        rows: int,
        form: RoutingForm,
        engine: InferenceEngine,
        kv: KVRows,
        cache_kwarg: str,
        pad_id: int,
        steps: int = 0,
        sampled: bool = False,
    ) -> None:
        device = engine.device
        self.rows, self.form, self.steps = rows, form, steps
        self.sampling = (
            RowSampling(steps, rows, engine.vocab_size, device) if steps and sampled else None
        )
        self.input_ids = torch.full((rows, 1), pad_id, dtype=torch.long, device=device)
        self.tokens = torch.zeros(steps, rows, dtype=torch.long, device=device)  # [K, R]
        self.logprobs = torch.zeros(steps, rows, dtype=torch.float32, device=device)
        self.slots: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.table: torch.Tensor | None = None
        self.usage: torch.Tensor | None = None
        if isinstance(form, ExampleForm):
            self.slots = torch.full((rows, form.width), -1, dtype=torch.long, device=device)
            self.weights = torch.zeros(rows, form.width, dtype=engine.dtype, device=device)
        else:
            experts = form.router.num_experts
            self.table = torch.zeros(experts, dtype=torch.long, device=device)
            self.usage = torch.zeros(rows, experts, dtype=torch.float32, device=device)
        self._engine, self._kv, self._cache_kwarg = engine, kv, cache_kwarg
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None

    def _routing(self) -> AbstractContextManager[None]:
        bank = self._engine.bank
        if isinstance(self.form, ExampleForm):
            assert self.slots is not None and self.weights is not None
            return bank.route_examples(self.slots, self.weights, validate=False)
        form, table, usage = self.form, self.table, self.usage
        assert table is not None and usage is not None
        names = self._engine.router_modules(form.router)
        experts = form.router.num_experts

        def route(module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            name = names.get(module)
            if name is None:  # a module this router does not route: no expert
                return (
                    torch.full((hidden.shape[0], 1), -1, dtype=torch.long, device=hidden.device),
                    hidden.new_zeros(hidden.shape[0], 1),
                )
            decision = form.router.route_tokens(name, hidden, form.top_k)
            usage.add_(decision.to_dense(experts).float())
            return table[decision.indices], decision.weights

        return bank.route_tokens(route)

    def _run(self) -> torch.Tensor | None:
        """What the graph holds: one step's logits [R, V], or a greedy chunk (``None``)."""
        if self.usage is not None:
            self.usage.zero_()
        if not self.steps:
            return self._forward()
        decode_chunk(
            self._forward, self.input_ids, self._kv, self.tokens, self.logprobs, self.sampling
        )
        return None

    def _forward(self) -> torch.Tensor:
        kv = self._kv
        mask = kv.step_mask(self.rows, kv.capacity)
        assert kv.positions is not None
        with self._routing():
            out = self._engine.model(
                input_ids=self.input_ids,
                attention_mask=mask,
                position_ids=kv.positions[: self.rows, None],
                use_cache=True,
                **{self._cache_kwarg: kv.cache},
            )
        return out.logits[:, -1]

    def capture(self, warmups: int = 2) -> None:
        """Warm up on a side stream (Triton builds, router tables placed), then capture.

        The warm-up runs really write keys/values at the rows' next columns (the replay
        overwrites them) and, for a chunk, move the positions and input ids: both are put back.
        """
        kv = self._kv
        assert kv.positions is not None
        positions, input_ids = kv.positions.clone(), self.input_ids.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                self._run()
                kv.positions.copy_(positions)
                self.input_ids.copy_(input_ids)
        torch.cuda.current_stream().wait_stream(stream)
        # thread_local: another thread's synchronising call (a Predict, a router fit, another
        # engine) neither fails nor invalidates this capture, which runs on its own stream;
        # under the default "global" mode it did both (seen on an H100 with two engines)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self._run()

    def replay(self) -> torch.Tensor | None:
        """Run the step; its logits [R, V], or ``None`` for a chunk (see ``tokens``)."""
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """The captured decode steps of one scheduler (see the module docstring)."""

    def __init__(
        self,
        engine: InferenceEngine,
        kv: KVRows,
        cache_kwarg: str,
        pad_id: int,
        max_graphs: int = 48,
    ) -> None:
        self.engine, self.kv = engine, kv
        self.cache_kwarg, self.pad_id = cache_kwarg, pad_id
        self.max_graphs = max_graphs
        self.buckets = sorted({min(2**i, kv.max_rows) for i in range(kv.max_rows.bit_length() + 1)})
        self._graphs: collections.OrderedDict[tuple[Any, ...], _Graph] = collections.OrderedDict()
        self._failed: set[tuple[Any, ...]] = set()
        #: (form, steps, sampled) of recent batches, oldest first: what idle time captures
        self._families: collections.OrderedDict[tuple[RoutingForm, int, bool], None] = (
            collections.OrderedDict()
        )
        self._widest = 0  # the most rows a batch has used: idle capture stops there
        self.failures: list[str] = []  # why captures failed (logs, tests)
        self.captures = 0  # graphs captured (metrics, tests)
        self.capture_seconds = 0.0  # worker time spent capturing (metrics)
        self.replays = 0

    @staticmethod
    def enabled_for(engine: InferenceEngine) -> bool:
        """Whether decode steps can be captured as CUDA graphs: the engine runs on a CUDA device."""
        return engine.device.type == "cuda" and torch.cuda.is_available()

    def bucket(self, rows: int) -> int:
        """The smallest captured batch size holding ``rows`` rows."""
        return next(b for b in self.buckets if b >= rows)

    def run(
        self,
        rows: int,
        form: RoutingForm | None,
        input_ids: list[int],
        fill: Callable[[_Graph], None],
        collect: Callable[[_Graph], None],
        steps: int = 0,
        sampling: Sequence[SamplingParams | None] | None = None,
        generator: torch.Generator | None = None,
    ) -> _Graph | None:
        """Replay the step for ``rows`` rows (a bucket; ``input_ids``: one token per row)
        after ``fill(graph)`` wrote the routing buffers, then ``collect(graph)`` reads its
        routing usage; ``None`` when this batch runs eagerly instead. ``steps`` 0: the graph's
        ``logits`` [rows, V] hold the step's logits; else its ``tokens``/``logprobs`` [steps,
        rows] hold a chunk, greedy or, with ``sampling`` (each row's parameters; ``None``: a
        row no request uses), sampled with noise from ``generator`` (static buffers: read them
        before the next replay)."""
        if form is None:
            return None
        if isinstance(form, TokenForm) and not token_mixing_without_host_sync(
            self.engine.device, self.engine.dtype
        ):
            return None  # float32 token mixing reads segment bounds back: not capturable
        self._widest = max(self._widest, rows)
        family = (form, steps, sampling is not None)
        self._families[family] = None
        self._families.move_to_end(family)
        while len(self._families) > PRECAPTURED_FAMILIES:
            self._families.popitem(last=False)
        key = self._key(rows, family)
        if key in self._failed:
            return None
        graph = self._graphs.get(key)
        self.kv.prepare_step(rows, full_width=True)
        ids = torch.tensor(input_ids).view(rows, 1)
        if graph is None:
            graph = self._capture(key, rows, family, ids, fill, sampling, generator)
            if graph is None:
                return None
        else:
            self._graphs.move_to_end(key)
            graph.input_ids.copy_(ids, non_blocking=True)
            fill(graph)
            if graph.sampling is not None and sampling is not None:
                graph.sampling.fill(sampling, generator)
        self.replays += 1
        graph.replay()
        collect(graph)
        return graph

    def capture_missing(self) -> bool:
        """Capture one graph that the recent batch shapes will need and do not have yet;
        whether one was captured. The scheduler calls it while no request runs or waits.

        Requests arrive one by one, so the rows of a burst pass through buckets that earlier
        bursts did not: each first use captured its graph on the spot, and every request in the
        batch waited for it (0.7 s each for a 1.1B Llama's chunk of 8 steps on an H100, a median
        time to first token of 2.1 s for a 32-request burst against 0.4 s without). Capturing
        every bucket up to the widest batch so far, for the :data:`PRECAPTURED_FAMILIES` most
        recent routing forms, while idle (as vLLM captures its batch sizes at start) moves that
        cost out of the requests' way.
        A capture neither reads nor changes a request: no row is in use.
        """
        missing = next(self._missing(), None)
        if missing is None:
            return False
        rows, family, key = missing
        self.kv.prepare_step(rows, full_width=True)
        ids = torch.full((rows, 1), self.pad_id, dtype=torch.long)
        sampling = [None] * rows if family[2] else None
        return self._capture(key, rows, family, ids, _no_routing, sampling, None) is not None

    def pending(self) -> int:
        """Graphs :meth:`capture_missing` would still capture."""
        return sum(1 for _ in self._missing())

    def _missing(self) -> Iterator[tuple[int, tuple[RoutingForm, int, bool], tuple[Any, ...]]]:
        """(rows, family, key) of each graph idle time should capture, most recent form first."""
        if self.kv.positions is None:
            return
        room = self.max_graphs - len(self._graphs)
        for family in reversed(self._families):
            for rows in self.buckets:
                if rows > self._widest:  # wider batches capture on first use: no memory for
                    break  # graphs of a width the traffic never reached
                key = self._key(rows, family)
                if key in self._graphs or key in self._failed:
                    continue
                if room <= 0:
                    return
                room -= 1
                yield rows, family, key

    def _key(self, rows: int, family: tuple[RoutingForm, int, bool]) -> tuple[Any, ...]:
        """What a graph depends on: the rows bucket, the routing form, the steps and whether
        it samples, and the buffers it reads (the KV rows' and the bank's)."""
        first = next(iter(self.engine.bank.modules.values()))
        return (
            rows,
            *family,
            self.kv.generation,
            self.kv.capacity,
            first.A.data_ptr(),
            first.A.shape[0],
        )

    def _capture(
        self,
        key: tuple[Any, ...],
        rows: int,
        family: tuple[RoutingForm, int, bool],
        ids: torch.Tensor,
        fill: Callable[[_Graph], None],
        sampling: Sequence[SamplingParams | None] | None,
        generator: torch.Generator | None,
    ) -> _Graph | None:
        """Capture the graph of ``key`` (``None``: it failed, that key runs eagerly)."""
        form, steps, sampled = family
        graph = _Graph(
            rows, form, self.engine, self.kv, self.cache_kwarg, self.pad_id, steps, sampled
        )
        graph.input_ids.copy_(ids)
        fill(graph)
        if graph.sampling is not None and sampling is not None:
            graph.sampling.fill(sampling, generator)
        # a form already captured has built its kernels: one warm-up run is enough
        built = any(k[1:4] == key[1:4] for k in self._graphs)
        start = time.perf_counter()
        try:
            with _CAPTURING:
                graph.capture(warmups=1 if built else 2)
        except Exception as exc:
            log.warning(
                "decode step could not be captured in a CUDA graph (%s, %d rows); it runs eagerly",
                type(form).__name__,
                rows,
                exc_info=True,
            )
            self.failures.append(f"{type(form).__name__}, {rows} rows: {exc!r}")
            self._failed.add(key)
            torch.cuda.synchronize()
            return None
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        self.captures += 1
        log.info(
            "captured a decode graph in %.2f s: %d rows, %s, %d steps%s (%d graphs kept)",
            seconds,
            rows,
            describe(form),
            steps,
            ", sampled" if sampled else "",
            len(self._graphs) + 1,
        )
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph


def _no_routing(graph: _Graph) -> None:
    """A pre-captured graph's routing buffers keep their neutral start (no row in use)."""
