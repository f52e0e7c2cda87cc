"""A bank of LoRA experts inside one base model, mixed per example or per token at serving time.

For every adapted linear layer (module) ``W`` [d_out, d_in] of the frozen base model, the bank
holds every resident expert's LoRA factors in two stacked buffers, one row per *slot*::

    A   [capacity, r_max, d_in]     A[s, :r_e]  = A_e                    (rows r_e.. are zero)
    B^T [capacity, r_max, d_out]    B^T[s, :r_e] = (scaling_e * B_e)^T   (scaling folded in)

so that slot ``s`` of expert ``e`` (rank ``r_e <= r_max``) gives ``delta W_e = B_e A_e`` exactly
(zero padding adds nothing). ``B`` is kept transposed so that ``B^T`` viewed as ``[capacity
r_max, d_out]`` is a plain matrix whose rows the token mixer reads without a copy;
:attr:`RoutedLoraLinear.B` is the [capacity, d_out, r_max] view of it. A slot index is shared
by every module of the bank; an expert that does not adapt a module has zeros there.

The layer computes (see :mod:`.mixing` for the kernels and their cost)::

    y = W x + b + sum_j w_j B_{s_j} A_{s_j} x

where the slots ``s_j`` and weights ``w_j`` come from the routing in force:

* :meth:`LoraBank.route_examples` — per example (every token of example ``b`` uses
  ``slots[b]``, ``weights[b]``); top-1 with weight 1 is the single adapter, and ``k > 1`` is
  exact linear merging ``(sum_j w_j delta W_j) x``;
* :meth:`LoraBank.route_tokens` — per token and module: a callback
  ``router(module_name, hidden [N, d_in]) -> (slots [N, k], weights [N, k])`` is called in every
  module with that module's input (Arrow, Ostapenko et al. 2024; PHATGOOSE, Muqeeth et al.
  2024); the bank does not care which method produced the decision;
* :meth:`LoraBank.no_routing` (and outside any context) — the base model only.

Capacity grows by amortised doubling when a slot beyond it is written: the module objects and
the base weights stay where they are (the model is never rebuilt), and a forward pass never
re-stacks weights; removing an expert zeroes its slot and returns it to a free list.

The design follows S-LoRA's unified memory pool and Punica's slot-indexed kernels (Sheng et
al., 2023, https://arxiv.org/abs/2311.03285; Chen et al., 2023,
https://arxiv.org/abs/2310.18547), with the module wrapping and target matching of PEFT's
``tuners/lora``.

The routing in force is one value shared by all modules of a bank (not thread-local): run one
routed forward pass at a time per bank.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moerge.coordinator.inference.mixing import (
    add_example_mixed_delta_,
    add_token_mixed_delta_,
    clean_example_decision,
    example_mixed_delta,
    groups_example_mixing,
    token_mixed_delta,
)
from moerge.coordinator.inference.peft_lora import lora_weights_from_peft

if TYPE_CHECKING:
    from moerge.router_training.base import Router

__all__ = ["LoraBank", "RoutedLoraLinear", "TokenRouterFn"]

#: ``router(module_name, hidden [N, d_in]) -> (slots [N, k] long, weights [N, k])``
TokenRouterFn = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------------------
# routing state
# ------------------------------------------------------------------------------------------
@dataclass
class _ExampleRouting:
    slots: torch.Tensor  # [B, k] long
    weights: torch.Tensor  # [B, k]
    #: (slots with -1 -> 0, weights in the bank's dtype with 0 there), shared by every module
    clean: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _TokenRouting:
    router: TokenRouterFn


class _RoutingState:
    """The routing in force for every module of one bank (``None``: base model only)."""

    def __init__(self) -> None:
        self.current: _ExampleRouting | _TokenRouting | None = None
        #: example routing of one token per row (decode) through the Triton BGMV kernels
        self.bgmv_kernels = False

    @contextmanager
    def use(self, routing: _ExampleRouting | _TokenRouting | None) -> Iterator[None]:
        previous, self.current = self.current, routing
        try:
            yield
        finally:
            self.current = previous


# ------------------------------------------------------------------------------------------
# one adapted module
# ------------------------------------------------------------------------------------------
class RoutedLoraLinear(nn.Module):
    """Wraps a frozen base nn.Linear; holds all experts' LoRA factors of this module in stacked,
    contiguous buffers A [capacity, r_max, d_in] and B [capacity, d_out, r_max] (scaling folded
    into B), grown in place (amortised doubling) when experts are added, so adding an expert
    never rebuilds the model and a forward pass never re-stacks weights.

    ``B`` is a view of the contiguous buffer ``B_t`` [capacity, r_max, d_out] (see the module
    docstring for why). Buffers are non-persistent: the model's ``state_dict`` is unchanged
    apart from the ``base_layer.`` prefix of the wrapped layer.
    """

    # The buffers, declared so that they type as tensors (not nn.Module.__getattr__'s union).
    A: torch.Tensor
    B_t: torch.Tensor

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        max_rank: int,
        capacity: int = 8,
        state: _RoutingState | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(base_layer).__name__}")
        if max_rank < 1 or capacity < 1:
            raise ValueError(f"max_rank and capacity must be >= 1, got {max_rank}, {capacity}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.name = name
        self.r_max = int(max_rank)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self._state = state if state is not None else _RoutingState()
        weight = base_layer.weight
        opts: dict[str, Any] = {"dtype": weight.dtype, "device": weight.device}
        self.register_buffer(
            "A", torch.zeros(capacity, self.r_max, self.in_features, **opts), persistent=False
        )
        self.register_buffer(
            "B_t", torch.zeros(capacity, self.r_max, self.out_features, **opts), persistent=False
        )

    # -- the base layer's attributes, for code that reads them (e.g. ``q_proj.weight.dtype``)
    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight, so code that reads ``module.weight`` still works."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped layer's bias."""
        return self.base_layer.bias

    @property
    def B(self) -> torch.Tensor:
        """[capacity, d_out, r_max] view of the up-projections (scaling folded in)."""
        return self.B_t.transpose(1, 2)

    @property
    def capacity(self) -> int:
        """Expert slots of this module's factor buffers."""
        return self.A.shape[0]

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` slots; grows to ``max(capacity, 2 * current)``."""
        if capacity <= self.capacity:
            return
        new = max(capacity, 2 * self.capacity)
        for key in ("A", "B_t"):
            old = getattr(self, key)
            grown = old.new_empty(new, *old.shape[1:])
            grown[: old.shape[0]].copy_(old)
            grown[old.shape[0] :].zero_()
            setattr(self, key, grown)

    @torch.no_grad()
    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Write one expert: ``A`` [r, d_in], ``B`` [d_out, r], r <= r_max (zero-padded)."""
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{self.name}: expected A [r, d_in] and B [d_out, r], "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        r = A.shape[0]
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features:
            raise ValueError(
                f"{self.name}: expert factors {tuple(A.shape)}, {tuple(B.shape)} do not fit a "
                f"layer of {self.in_features} -> {self.out_features}"
            )
        if r > self.r_max:
            raise ValueError(f"{self.name}: rank {r} exceeds the bank's max_rank {self.r_max}")
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        self.reserve(slot + 1)
        A_dst, B_dst = self.A[slot], self.B_t[slot]  # [r_max, d_in], [r_max, d_out]
        A_dst[:r].copy_(A)
        A_dst[r:].zero_()
        # Scale in float32 before the cast, so that bf16 banks round once.
        B_dst[:r].copy_(B.detach().to(torch.float32).t() * float(scaling))
        B_dst[r:].zero_()

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Zero one slot (so it contributes nothing); grows capacity if needed."""
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        if slot >= self.capacity:
            self.reserve(slot + 1)  # new rows are zero already
            return
        self.A[slot].zero_()
        self.B_t[slot].zero_()

    def nbytes_per_slot(self) -> int:
        """Bytes one expert's A and B take at the maximum rank."""
        return self.r_max * (self.in_features + self.out_features) * self.A.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., d_in] -> base(x) + routed delta per the current routing context."""
        out = self.base_layer(x)
        routing = self._state.current
        if routing is None:
            return out
        if isinstance(routing, _ExampleRouting):
            if self._adds_in_place(x, out, routing):
                assert routing.clean is not None
                x3 = x.reshape(x.shape[0], -1, self.in_features)  # [B, T, d_in]
                out3 = out.view(x.shape[0], -1, self.out_features)  # [B, T, d_out]
                add_example_mixed_delta_(
                    out3, x3, self.A, self.B, *routing.clean, kernels=self._state.bgmv_kernels
                )
                return out
            delta = self._example_delta(x, routing)
        elif torch.is_grad_enabled():
            delta = self._token_delta(x, routing.router)
        else:  # serving: mix straight into the output
            hidden = x.reshape(-1, self.in_features)  # [N, d_in]
            slots, weights = routing.router(self.name, hidden)  # [N, k], [N, k]
            add_token_mixed_delta_(
                out.view(-1, self.out_features),
                hidden,
                self.A,
                self.B,
                slots.to(x.device),
                weights.to(x.device),
            )
            return out
        if not torch.is_grad_enabled():  # serving: add in place, rounding once to out's dtype
            return out.add_(delta)
        return out + delta.to(out.dtype)

    def _adds_in_place(self, x: torch.Tensor, out: torch.Tensor, routing: _ExampleRouting) -> bool:
        """Serving, one routing row per example, one dtype: add the delta into ``out`` with
        the decision cleaned once per forward, unless :func:`example_mixed_delta` would group
        the examples by expert instead."""
        rows, k = routing.slots.shape
        return (
            routing.clean is not None
            and not torch.is_grad_enabled()
            and x.dim() >= 2
            and x.shape[0] == rows
            and x.dtype == out.dtype == self.A.dtype
            and out.is_contiguous()
            and not groups_example_mixing(
                x.device, k, self.r_max, x[0].numel() // self.in_features, self.in_features, rows
            )
        )

    def _example_delta(self, x: torch.Tensor, routing: _ExampleRouting) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"{self.name}: example routing needs a batch dimension, got {x.shape}")
        slots, weights = routing.slots, routing.weights
        n_examples, rows = slots.shape[0], x.shape[0]
        if rows != n_examples:
            # generate() expands each example into consecutive rows (beams, several returns)
            if n_examples == 0 or rows % n_examples:
                raise ValueError(
                    f"{self.name}: routing has {n_examples} examples, the batch has {rows} rows"
                )
            repeat = rows // n_examples
            slots = slots.repeat_interleave(repeat, dim=0)
            weights = weights.repeat_interleave(repeat, dim=0)
        xb = x.reshape(rows, -1, self.in_features)  # [B, T, d_in]
        delta = example_mixed_delta(xb, self.A, self.B, slots, weights)  # [B, T, d_out]
        return delta.reshape(*x.shape[:-1], self.out_features)

    def _token_delta(self, x: torch.Tensor, router: TokenRouterFn) -> torch.Tensor:
        hidden = x.reshape(-1, self.in_features)  # [N, d_in]
        slots, weights = router(self.name, hidden)  # [N, k], [N, k]
        delta = token_mixed_delta(
            hidden, self.A, self.B, slots.to(x.device), weights.to(x.device), keep_float32=True
        )  # [N, d_out]
        return delta.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """The module's shapes and capacity in ``print(model)``."""
        return (
            f"name={self.name!r}, in_features={self.in_features}, "
            f"out_features={self.out_features}, r_max={self.r_max}, capacity={self.capacity}"
        )


# ------------------------------------------------------------------------------------------
# the bank
# ------------------------------------------------------------------------------------------
def _matches_target(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a regex string must match the whole path; list entries match a suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


class LoraBank:
    """All RoutedLoraLinear modules of one model plus the expert -> slot table."""

    def __init__(self, modules: Mapping[str, RoutedLoraLinear], state: _RoutingState) -> None:
        if not modules:
            raise ValueError("a LoraBank needs at least one module")
        self.modules: dict[str, RoutedLoraLinear] = dict(modules)
        self._state = state
        self._slots: dict[str, int] = {}
        self._free: list[int] = []  # released slots, reused lowest first
        self._next_slot = 0

    @property
    def bgmv_kernels(self) -> bool:
        """Whether example routing of one token per row (a decode step) runs as the Triton
        BGMV kernels (:mod:`.bgmv_triton`) on CUDA in half precision; else PyTorch's gathered
        batched matmuls."""
        return self._state.bgmv_kernels

    @bgmv_kernels.setter
    def bgmv_kernels(self, enabled: bool) -> None:
        self._state.bgmv_kernels = enabled

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def inject(
        cls,
        model: nn.Module,
        target_modules: str | Sequence[str],
        max_rank: int,
        initial_capacity: int = 8,
    ) -> LoraBank:
        """Replace every ``nn.Linear`` whose path matches ``target_modules`` (as PEFT: suffix
        match for a list, full regex match for a string) by a :class:`RoutedLoraLinear`, in
        place, and return the bank over them."""
        state = _RoutingState()
        found: dict[str, RoutedLoraLinear] = {}
        for name, module in list(model.named_modules()):
            if not name or not _matches_target(name, target_modules):
                continue
            if isinstance(module, RoutedLoraLinear):
                raise ValueError(f"{name} is already part of a LoraBank")
            if not isinstance(module, nn.Linear):
                continue  # e.g. a container whose name ends like a target
            routed = RoutedLoraLinear(module, name, max_rank, initial_capacity, state)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, routed)
            found[name] = routed
        if not found:
            raise ValueError(f"no nn.Linear module matches target_modules={target_modules!r}")
        return cls(found, state)

    # -- experts --------------------------------------------------------------------------
    @property
    def expert_ids(self) -> list[str]:
        """Resident experts, in slot order."""
        return sorted(self._slots, key=self._slots.__getitem__)

    @property
    def capacity(self) -> int:
        """Experts the bank can hold at once (the smallest module's capacity)."""
        return min(m.capacity for m in self.modules.values())

    def reserve(self, capacity: int) -> None:
        """Grow every module to at least ``capacity`` slots now (e.g. to a cache's expert
        budget), so that later additions never pay for a doubling."""
        for module in self.modules.values():
            module.reserve(capacity)

    def __contains__(self, expert_id: object) -> bool:
        return expert_id in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def slot_of(self, expert_id: str) -> int:
        """The slot an expert is loaded in; ``KeyError`` naming it when it is not."""
        try:
            return self._slots[expert_id]
        except KeyError:
            raise KeyError(f"expert {expert_id!r} is not in the bank") from None

    def slots_of(self, expert_ids: Sequence[str]) -> torch.Tensor:
        """[len(expert_ids)] long: slots in the given order (map router indices to slots)."""
        device = next(iter(self.modules.values())).A.device
        return torch.tensor([self.slot_of(e) for e in expert_ids], dtype=torch.long, device=device)

    def nbytes_of(self, expert_id: str) -> int:
        """Bank memory held by the expert's slot: every module's rows, padded to ``max_rank``.

        This is what a byte budget should count: the bank allocates whole slots, whatever the
        expert's rank or the modules it adapts.
        """
        self.slot_of(expert_id)
        return sum(m.nbytes_per_slot() for m in self.modules.values())

    def _resolve(self, name: str) -> str:
        """Module path of an expert's module in this bank (exact, else a unique dotted suffix
        match either way, e.g. ``bert.encoder...query`` for ``encoder...query``)."""
        if name in self.modules:
            return name
        hits = [m for m in self.modules if m.endswith("." + name) or name.endswith("." + m)]
        if len(hits) != 1:
            reason = "matches several" if hits else "matches no"
            raise KeyError(f"expert module {name!r} {reason} module of the bank")
        return hits[0]

    def add_expert(
        self, expert_id: str, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]
    ) -> int:
        """Write an expert's factors (``module path -> (A [r, d_in], B [d_out, r], scaling)``)
        into a slot and return it; an expert already present is replaced in its slot. Modules
        of the bank that the expert does not adapt get zeros. Validates everything first, so
        a failure leaves the bank unchanged."""
        if not weights:
            raise ValueError(f"expert {expert_id!r} has no LoRA modules")
        resolved: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for name, (A, B, scaling) in weights.items():
            target = self._resolve(name)
            if target in resolved:
                raise ValueError(f"expert {expert_id!r}: two entries for module {target!r}")
            module = self.modules[target]
            r = A.shape[0]
            if (
                A.dim() != 2
                or B.dim() != 2
                or A.shape != (r, module.in_features)
                or B.shape != (module.out_features, r)
            ):
                raise ValueError(
                    f"expert {expert_id!r}, module {target!r}: factors {tuple(A.shape)}, "
                    f"{tuple(B.shape)} do not fit {module.in_features} -> {module.out_features}"
                )
            if r > module.r_max:
                raise ValueError(
                    f"expert {expert_id!r}, module {target!r}: rank {r} exceeds max_rank "
                    f"{module.r_max}"
                )
            if not math.isfinite(float(scaling)):
                raise ValueError(f"expert {expert_id!r}: scaling {scaling!r} is not finite")
            resolved[target] = (A, B, float(scaling))
        slot = self._slots.get(expert_id)
        if slot is None:
            slot = self._take_slot()
        for name, module in self.modules.items():
            if name in resolved:
                module.set_slot(slot, *resolved[name])
            else:
                module.clear_slot(slot)
        self._slots[expert_id] = slot
        return slot

    def remove_expert(self, expert_id: str) -> None:
        """Zero the expert's slot in every module and free it for the next expert."""
        slot = self.slot_of(expert_id)
        for module in self.modules.values():
            module.clear_slot(slot)
        del self._slots[expert_id]
        self._free.append(slot)
        self._free.sort()

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop(0)
        slot = self._next_slot
        self._next_slot += 1
        return slot

    # -- routing --------------------------------------------------------------------------
    def route_examples(
        self, slots: torch.Tensor, weights: torch.Tensor, validate: bool = True
    ) -> AbstractContextManager[None]:
        """Every token of example ``b`` gets ``sum_j weights[b, j] * delta_{slots[b, j]}``.

        ``slots`` [B, k] long (``-1`` with weight 0: no expert, i.e. the base model for that
        example), ``weights`` [B, k]. ``validate=False`` skips the range check, which reads the
        slots back to the host: for buffers filled from checked values (a CUDA graph's inputs,
        whose capture forbids reading back).
        """
        if slots.dim() != 2 or slots.shape != weights.shape:
            raise ValueError(
                f"slots and weights must both be [B, k], got {tuple(slots.shape)} and "
                f"{tuple(weights.shape)}"
            )
        if validate:
            self.check_slots(slots)
        first = next(iter(self.modules.values()))
        slots = slots.to(device=first.A.device, dtype=torch.long)
        weights = weights.to(first.A.device)
        clean = None
        if not torch.is_grad_enabled():  # serving: clean the decision once for every module
            clean = clean_example_decision(slots, weights, first.A.dtype)
        return self._state.use(_ExampleRouting(slots, weights, clean))

    def route_tokens(self, router: TokenRouterFn) -> AbstractContextManager[None]:
        """Per module: ``router(module_name, hidden [N, d_in]) -> (slots [N, k], weights
        [N, k])`` decides for every token of that module's input."""
        return self._state.use(_TokenRouting(router))

    def no_routing(self) -> AbstractContextManager[None]:
        """The base model only."""
        return self._state.use(None)

    def token_router(self, router: Router, top_k: int | None = None) -> TokenRouterFn:
        """Adapt a fitted token-level :class:`~moerge.router_training.base.Router` to
        :meth:`route_tokens`: its expert indices are mapped to this bank's slots (all of
        ``router.expert_ids`` must be resident)."""
        table = self.slots_of(router.expert_ids)  # [E_router]

        def route(module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            decision = router.route_tokens(module, hidden, top_k)
            return table[decision.indices.to(table.device)], decision.weights

        return route

    def check_slots(self, slots: torch.Tensor) -> None:
        """``ValueError`` unless every slot lies in ``[-1, capacity)`` (read back to the host)."""
        if slots.numel() == 0:
            return
        low, high = int(slots.min()), int(slots.max())
        if low < -1 or high >= self.capacity:
            raise ValueError(f"slots must lie in [-1, {self.capacity}), got [{low}, {high}]")

    #: PEFT's adapter files -> ``module path -> (A, B, scaling)`` (:mod:`.peft_lora`)
    lora_weights_from_peft = staticmethod(lora_weights_from_peft)
