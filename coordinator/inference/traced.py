"""A classification engine's forwards as TorchScript graphs: the GIL released once per forward.

Why: the coordinator runs gRPC's event loop and the engine's worker thread in one process.
PyTorch's Python bindings release the GIL around every operator, so an eager forward of a small
encoder hands the GIL to the event loop hundreds of times and waits to win it back after each
operator; beside a busy thread a batch of 16 took 4.8x its CPU time and 460x its wall time
(benchmarks/results/predict_overhead.md). A graph traced with :func:`torch.jit.trace` runs in
TorchScript's interpreter, which releases the GIL once for the whole graph and skips Python's
per-module overhead.

Two forwards of the serving path are traced, per set of encoding keys
(``input_ids``, ``attention_mask``, ...):

* :meth:`TracedForwards.pooled_per_row`: ``pooler_output`` [B, H] with row ``r`` through the
  expert in bank slot ``slots[r]`` alone (an ensemble's rows, top-1 routing);
* :meth:`TracedForwards.embeddings`: the routing embedding [B, H] of the base model alone
  (:func:`~.encoding.embeddings_of` of an encoder).

A trace records the Python branches its example took, so each method answers ``None`` (the
caller runs the eager forward) where a branch could differ: with autograd on, and where a bank
module would group the rows by expert (:func:`~.mixing.groups_example_mixing`, a CPU layer of
1024 inputs or more). Tensor shapes are not fixed by the trace (batch size and length vary).
The bank's buffers are referenced by the graph; they are replaced only when the bank grows,
so the graphs are traced again after a growth. Each new graph is checked against the eager
forward on the batch it was traced on; a trace that fails or differs turns tracing off for the
engine (logged), and every later forward runs eagerly.

Worker thread only, like everything the bank does.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn
from transformers import BatchEncoding, PreTrainedModel

from moerge.coordinator.inference.encoding import embeddings_of
from moerge.coordinator.inference.lora_bank import LoraBank
from moerge.coordinator.inference.mixing import groups_example_mixing

log = logging.getLogger(__name__)

#: how closely a new graph's output must match the eager forward's for it to be used
TOLERANCE = 1e-4


class _Traceable(nn.Module):
    """One forward of the engine's ``model`` as a module of tensors only, as tracing needs;
    ``keys`` name the encoding's tensors in the order they are passed."""

    def __init__(self, model: PreTrainedModel, bank: LoraBank, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.bank = bank
        self.keys = keys

    def encoding(self, tensors: tuple[torch.Tensor, ...]) -> BatchEncoding:
        return BatchEncoding(dict(zip(self.keys, tensors, strict=True)))


class _PooledPerRow(_Traceable):
    """``(slots [B, 1], *encoding tensors) -> pooler_output [B, H]``, one expert per row."""

    def forward(self, slots: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        weights = torch.ones(slots.shape, dtype=self.model.dtype, device=slots.device)
        with self.bank.route_examples(slots, weights, validate=False):
            return self.model(**self.encoding(tensors)).pooler_output


class _Embeddings(_Traceable):
    """``(*encoding tensors) -> routing embeddings [B, H]`` of the base model alone."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        with self.bank.no_routing():
            return embeddings_of(self.model, self.encoding(tensors), False)


class TracedForwards:
    """The traced graphs of one classification engine (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, bank: LoraBank) -> None:
        self.model = model
        self.bank = bank
        self.enabled = True
        #: (which forward, encoding keys) -> its graph
        self._graphs: dict[tuple[str, tuple[str, ...]], torch.jit.ScriptModule] = {}
        self._capacity = bank.capacity  # the bank's buffers the graphs were traced with
        self._widths = {(m.r_max, m.in_features) for m in bank.modules.values()}

    def pooled_per_row(self, enc: BatchEncoding, slots: torch.Tensor) -> torch.Tensor | None:
        """``pooler_output`` [B, H] of ``enc`` with row ``r`` through the expert in bank slot
        ``slots[r]`` [B, 1] alone, weight 1; None where the eager forward must run."""
        rows, length = enc["input_ids"].shape
        device = enc["input_ids"].device
        if any(groups_example_mixing(device, 1, r, length, d_in, rows) for r, d_in in self._widths):
            return None
        self.bank.check_slots(slots)
        tensors = tuple(enc.values())
        return self._run(
            "pooled_per_row",
            tuple(enc.keys()),
            lambda keys: _PooledPerRow(self.model, self.bank, keys),
            (slots, *tensors),
        )

    def embeddings(self, enc: BatchEncoding) -> torch.Tensor | None:
        """Routing embeddings [B, H] of ``enc``'s rows (float32 on CPU); None: run eagerly."""
        return self._run(
            "embeddings",
            tuple(enc.keys()),
            lambda keys: _Embeddings(self.model, self.bank, keys),
            tuple(enc.values()),
        )

    def _run(
        self,
        kind: str,
        keys: tuple[str, ...],
        build: Callable[[tuple[str, ...]], nn.Module],
        inputs: tuple[torch.Tensor, ...],
    ) -> torch.Tensor | None:
        """The graph of ``(kind, keys)`` on ``inputs``, traced (and checked) on first use."""
        if not self.enabled or torch.is_grad_enabled():
            return None
        if self.bank.capacity != self._capacity:  # grown: new buffers, the graphs hold the old
            self._graphs.clear()
            self._capacity = self.bank.capacity
        graph = self._graphs.get((kind, keys))
        if graph is None:
            module = build(keys)
            try:
                graph = self._trace(module, inputs)
            except Exception:
                log.warning("tracing the %s forward failed; serving eagerly", kind, exc_info=True)
                self.enabled = False
                return None
            if not _agrees(graph, module, inputs):
                log.warning(
                    "the traced %s forward differs from the eager one; serving eagerly", kind
                )
                self.enabled = False
                return None
            self._graphs[(kind, keys)] = graph
        result: torch.Tensor = graph(*inputs)
        return result

    @staticmethod
    def _trace(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
        """``torch.jit.trace`` of ``module`` on ``inputs``, its warnings silenced: the
        branches it warns about are the ones :class:`TracedForwards` guards."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced: torch.jit.ScriptModule = torch.jit.trace(module, inputs, check_trace=False)
        return traced


def _agrees(
    graph: torch.jit.ScriptModule, module: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> bool:
    """Whether ``graph`` gives ``module``'s output on ``inputs`` and on their first row alone (a
    trace that fixed the batch size would fail the second)."""
    first = tuple(t[:1] for t in inputs)
    return all(
        torch.allclose(graph(*batch), module(*batch), atol=TOLERANCE, rtol=0)
        for batch in (inputs, first)
    )
