"""The LoRA bank's routing of one forward over the running batch's rows.

The scheduler (:mod:`.scheduler`) decodes many requests as rows of one batch; each request is
routed its own way, and the bank is told per forward how each row is routed:

* every row example-routed (one expert, an exact linear merge ``sum_j w_j B_j A_j``, a temporary
  TIES/DARE slot, or the base model): ``LoraBank.route_examples(slots [R, k], weights [R, k])``,
  the fast path (rows of no request get slot -1: the base model);
* any row token-routed: ``LoraBank.route_tokens`` with a callback that asks each token router
  about its own rows' tokens in every adapted module, at every step (*step-level routing* in the
  MoErging survey, Yadav et al., 2024), and gives the other rows their fixed slots. Each
  request's routing weights per expert are accumulated on the device and reported at its end.

:meth:`BatchRouting.form` says whether a captured CUDA graph can take the batch
(:mod:`.cuda_graphs`), :meth:`BatchRouting.fill` writes it into a graph's buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from moerge.coordinator.inference.generation.cuda_graphs import (
    ExampleForm,
    RoutingForm,
    TokenForm,
)

if TYPE_CHECKING:
    from moerge.coordinator.inference.engine import InferenceEngine
    from moerge.router_training.base import Router


@dataclass
class TokenRouting:
    """A token-level router bound to the bank: its slot table and module names."""

    router: Router
    top_k: int | None
    slot_table: torch.Tensor  # [E] long: router expert index -> bank slot
    names: dict[str, str]  # bank module -> the router's module name


class RoutedRows(Protocol):
    """What the routing needs of a running request (the scheduler's bookkeeping has more)."""

    rows: int  # k for an output ensemble, else 1
    slots: list[list[int]]  # per row (example routing); [] for token routing
    weights: list[list[float]]
    token: TokenRouting | None
    usage: torch.Tensor | None  # [E] token-routing weight received so far


class BatchRouting:
    """The bank routing of one forward over ``rows`` rows: member ``i`` occupies rows
    ``starts[i] ..`` (rows of no member decode nothing anyone reads: the base model); token
    routing weights are accumulated per member."""

    def __init__(
        self,
        engine: InferenceEngine,
        members: Sequence[RoutedRows],
        starts: Sequence[int],
        rows: int,
    ) -> None:
        self.bank = engine.bank
        device, dtype = engine.device, engine.dtype
        self.rows = rows
        # token routers: id(router) -> (routing, member rows, members)
        self.token_groups: dict[int, tuple[TokenRouting, list[int], list[RoutedRows]]] = {}
        width = max((len(s) for m in members if m.token is None for s in m.slots), default=1)
        slots = [[-1] * width for _ in range(rows)]
        weights = [[0.0] * width for _ in range(rows)]
        for m, start in zip(members, starts, strict=True):
            if m.token is not None:
                group = self.token_groups.setdefault(id(m.token.router), (m.token, [], []))
                group[1].append(start)
                group[2].append(m)
                continue
            for j in range(m.rows):
                slots[start + j][: len(m.slots[j])] = m.slots[j]
                weights[start + j][: len(m.weights[j])] = m.weights[j]
        self.has_fixed = any(m.token is None for m in members)
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)  # [R, k]
        self.weights = torch.tensor(weights, dtype=dtype, device=device)  # [R, k]
        self.group_rows = {
            key: torch.tensor(rows_, dtype=torch.long, device=device)
            for key, (_, rows_, _) in self.token_groups.items()
        }
        self.usage = {
            key: torch.zeros(len(rows_), group.router.num_experts, device=device)
            for key, (group, rows_, _) in self.token_groups.items()
        }
        self.mask: torch.Tensor | None = None  # [R, T] for prefill (padding is not usage)

    def form(self) -> RoutingForm | None:
        """This batch's routing as a CUDA graph takes it (``None``: mixed, run eagerly)."""
        if not self.token_groups:
            return ExampleForm(int(self.slots.shape[1]))
        if self.has_fixed or len(self.token_groups) > 1:
            return None
        ((routing, _, _),) = self.token_groups.values()
        return TokenForm(routing.router, routing.top_k)

    def fill(self, graph: Any) -> None:
        """Write this batch's routing into a captured step's buffers."""
        if graph.slots is not None:
            graph.slots.copy_(self.slots)
            graph.weights.copy_(self.weights)
        else:
            ((routing, _, _),) = self.token_groups.values()
            graph.table.copy_(routing.slot_table)

    def collect(self, graph: Any) -> None:
        """After a replay: add the step's token-routing weights to each member's."""
        if graph.usage is not None:
            for key, rows in self.group_rows.items():
                self.usage[key] += graph.usage.index_select(0, rows)

    def context(self, mask: torch.Tensor | None = None) -> AbstractContextManager[None]:
        """The bank's routing context for one forward: example routing by slots and weights, or
        token routing through the routers; ``mask`` marks the real tokens."""
        self.mask = mask
        if not self.token_groups:
            return self.bank.route_examples(self.slots, self.weights)
        return self.bank.route_tokens(self._route)

    def _route(self, module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token of ``hidden`` [N = R * T, d]: (slots [N, k], weights [N, k])."""
        n = hidden.shape[0]
        length = n // self.rows
        parts: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
        if self.has_fixed:  # every row's fixed routing; token-routed rows are overwritten
            parts.append(
                (
                    None,
                    self.slots.repeat_interleave(length, 0),
                    self.weights.repeat_interleave(length, 0),
                )
            )
        for key, (group, rows, _) in self.token_groups.items():
            if module not in group.names:
                continue
            everything = len(rows) == self.rows
            tokens = None if everything else _token_index(self.group_rows[key], length)
            x = hidden if tokens is None else hidden.index_select(0, tokens)
            decision = group.router.route_tokens(group.names[module], x, group.top_k)
            self._add_usage(key, decision.indices, decision.weights, len(rows), length)
            parts.append((tokens, group.slot_table[decision.indices], decision.weights))
        if len(parts) == 1 and parts[0][0] is None:
            return parts[0][1], parts[0][2]
        width = max((p[1].shape[1] for p in parts), default=1)
        slots = torch.full((n, width), -1, dtype=torch.long, device=hidden.device)
        weights = torch.zeros(n, width, dtype=hidden.dtype, device=hidden.device)
        for tokens, s, w in parts:
            index = tokens if tokens is not None else slice(None)
            slots[index, : s.shape[1]] = s
            weights[index, : w.shape[1]] = w.to(weights.dtype)
        return slots, weights

    def _add_usage(
        self, key: int, indices: torch.Tensor, weights: torch.Tensor, members: int, length: int
    ) -> None:
        """Add each member's tokens' routing weights (``indices``/``weights`` [members * length,
        k]) to its usage [members, E], padding excluded: ``O(N k)`` scattered adds where a dense
        [N, E] matrix cost ``O(N E)`` (at E = 4,096 and a prefill of 4,096 tokens, 67 MB written
        and read again in each of 88 modules)."""
        usage = self.usage[key]  # [members, E] float32
        experts = usage.shape[1]
        added = weights.float()  # [N, k]
        if self.mask is not None:
            rows = self.mask if members == self.rows else self.mask[self.group_rows[key]]
            added = added * rows.reshape(-1, 1).to(added)
        member = torch.arange(members, device=indices.device).repeat_interleave(length)  # [N]
        flat = (member.unsqueeze(1) * experts + indices).flatten()  # [N k]
        usage.view(-1).index_add_(0, flat, added.flatten())

    def flush_usage(self) -> None:
        """Add the accumulated token-routing weights to each request's total."""
        for key, (_, _, members) in self.token_groups.items():
            for i, m in enumerate(members):
                # a copy: the accumulator is zeroed below (a view of it lost the prompt's usage)
                step = self.usage[key][i]
                m.usage = step.clone() if m.usage is None else m.usage + step
            self.usage[key].zero_()


def _token_index(rows: torch.Tensor, length: int) -> torch.Tensor:
    """Flat token positions of ``rows`` in an [R, length] batch."""
    return (rows.unsqueeze(1) * length + torch.arange(length, device=rows.device)).flatten()
