"""What the token-level routers share: one vector per (module, expert), top-k per token.

Arrow and PHATGOOSE both keep, for every adapted module ``m`` (its path in the base model, e.g.
``encoder.layer.0.attention.self.query``), a matrix of expert vectors ``V_m`` [E_m, d_in] and
score each token ``h`` [d_in] of that module's input against them; they differ only in the
vectors and the score. An expert that does not adapt module ``m`` has no row in ``V_m``:
``members_m`` [E_m] maps rows to indices into ``expert_ids``, so decisions always index experts
globally, and ``top_k`` is bounded by ``E_m`` in that module.

Artifact tensors: ``vectors/<module>`` [E_m, d_in] and ``members/<module>`` [E_m] (int64).

Scores are computed on the hidden states' device, in their precision when that is half
precision (as PEFT's ``ArrowLoraLinearLayer`` does in the adapters' dtype) and in float32
otherwise; each module's table is placed there once and cached, not on every call. A router
extended by new experts (:meth:`ModuleVectorRouter._extended_by`, e.g. ``ArrowRouter.extended``)
appends their rows to the old router's tables, the float32 masters and the placed copies alike
(:mod:`.expert_table`): its first routed token costs O(new experts), not a copy of all E rows
to the device. A score is a
matmul ``linear_scores`` (``[N, d_in] @ V_m^T``), optionally made absolute (Arrow); on CUDA the
absolute value, the top-k, the softmax and the map to global expert indices then run as one
Triton kernel (:mod:`.topk_triton`) that reads the ``[N, E_m]`` scores once.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Self

import torch
import torch.nn.functional as F

from moerge.router_training import topk_triton
from moerge.router_training.base import (
    Granularity,
    Router,
    RouterConfig,
    RoutingDecision,
    top_k_softmax,
)
from moerge.router_training.expert_table import ExpertTable

VECTORS_PREFIX = "vectors/"
MEMBERS_PREFIX = "members/"

#: where and in which dtype a module's table is placed: ``(module, device, dtype)``
PlaceKey = tuple[str, torch.device, torch.dtype]


def score_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Half-precision hidden states are scored in their own dtype, anything else in float32."""
    return hidden.dtype if hidden.dtype in (torch.bfloat16, torch.float16) else torch.float32


class ModuleVectorRouter(Router):
    """Token-level router over per-module expert vectors (see the module docstring)."""

    granularity: ClassVar[Granularity] = "token"
    #: whether a token's score is ``|linear score|`` (Arrow) rather than the linear score itself
    absolute_scores: ClassVar[bool] = False

    def __init__(self, config: RouterConfig, expert_ids: Sequence[str]) -> None:
        super().__init__(config, expert_ids)
        #: float32 master tables (saved with the router): views of ``self._tables``' buffers
        self.vectors: dict[str, torch.Tensor] = {}
        self.members: dict[str, torch.Tensor] = {}
        self._tables: dict[str, ExpertTable] = {}
        #: placed tables, ``(vectors, members)`` views, and the buffers they view
        self._placed: dict[PlaceKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self._placed_tables: dict[PlaceKey, ExpertTable] = {}
        #: the router this one extends: its placed buffers and how many rows of them are ours
        self._inherited: dict[PlaceKey, tuple[ExpertTable, int]] = {}
        self._place_lock = threading.Lock()

    @property
    def modules(self) -> list[str]:
        """The module paths the router has expert vectors for, sorted."""
        return sorted(self.vectors)

    @property
    def temperature(self) -> float:
        """The softmax temperature of the config (every module-vector method has one)."""
        return float(self.config.temperature)  # type: ignore[attr-defined]

    def _set_vectors(self, per_module: Mapping[str, Sequence[tuple[int, torch.Tensor]]]) -> None:
        """Stack ``{module: [(expert index, vector [d_in]), ...]}`` into the routing tables."""
        self.vectors, self.members, self._tables = {}, {}, {}
        for module in sorted(per_module):
            rows = sorted(per_module[module], key=lambda item: item[0])
            members = torch.tensor([i for i, _ in rows], dtype=torch.long)
            self._set_table(module, ExpertTable.of(_stacked(module, rows), members), len(rows))
        self._forget_placements()

    def _set_table(self, module: str, table: ExpertTable, rows: int) -> None:
        """Route ``module`` over the first ``rows`` rows of the master ``table``."""
        self._tables[module] = table
        self.vectors[module], self.members[module] = table.view(rows)

    def _forget_placements(self) -> None:
        self._placed, self._placed_tables, self._inherited = {}, {}, {}

    def _extended_by(
        self, expert_ids: Sequence[str], added: Mapping[str, Sequence[tuple[int, torch.Tensor]]]
    ) -> Self:
        """This router's tables followed by ``added`` rows, ``{module: [(expert index, vector
        [d_in]), ...]}`` with indices past this router's experts, as a new router over
        ``expert_ids``: what :meth:`Router.extended` returns for a method whose vectors are per
        expert. Equal to :meth:`_set_vectors` over the old rows and the new ones.

        Costs ``O(new rows)`` (:mod:`.expert_table`): the master tables are appended to, and
        the new router inherits this one's placed tables, to which its first routed token on
        that device and dtype appends the new rows (on the caller's stream, like any
        placement) instead of copying all ``E`` rows there. This router is left unchanged.
        """
        router = type(self)(self.config, expert_ids)
        for module in sorted(set(self.vectors) | set(added)):
            rows = sorted(added.get(module, ()), key=lambda item: item[0])
            members = torch.tensor([i for i, _ in rows], dtype=torch.long)
            if module not in self.vectors:
                table = ExpertTable.of(_stacked(module, rows), members)
                router._set_table(module, table, len(rows))
                continue
            old, table = len(self.members[module]), self._tables[module]
            if rows:
                table = table.appended(old, _stacked(module, rows, self.vectors[module]), members)
            router._set_table(module, table, old + len(rows))
        with self._place_lock:  # what this router placed, or inherited and did not place yet
            router._inherited = {
                **self._inherited,
                **{
                    key: (table, len(self._placed[key][1]))
                    for key, table in self._placed_tables.items()
                },
            }
        return router

    def _lookup(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.vectors[module], self.members[module]
        except KeyError:
            raise ValueError(
                f"router '{self.method}' does not route module {module!r}; "
                f"known modules: {self.modules}"
            ) from None

    def _placed_for(self, module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's ``(vectors, members)`` on ``hidden``'s device, vectors in the score
        dtype (see the module docstring); cached per module, device and dtype."""
        dtype = score_dtype(hidden)
        placed = self._placed.get((module, hidden.device, dtype))
        return placed if placed is not None else self.placed_tables(module, hidden.device, dtype)

    def placed_tables(
        self, module: str, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's ``(vectors [E_m, d_in] in dtype, members [E_m])`` on ``device``, as
        routing reads them; placed on the first call and cached.

        A first placement copies the master table (``O(E_m)``), unless the device and dtype
        are the master's (then it is the master, no copy). A router made by
        :meth:`_extended_by` appends its new rows to the table it inherited from the router
        it extends (``O(new rows)``), sharing that buffer when there is room.
        """
        key = (module, torch.device(device), dtype)
        with self._place_lock:
            placed = self._placed.get(key)
            if placed is not None:
                return placed
            vectors, members = self._lookup(module)
            if vectors.device == key[1] and vectors.dtype == dtype:
                placed = (vectors, members)  # the master itself, as Tensor.to would return
            else:
                inherited = self._inherited.pop(key, None)
                if inherited is None:
                    table = ExpertTable.of(vectors, members, key[1], dtype)
                else:
                    table, old = inherited
                    if old < len(members):
                        table = table.appended(old, vectors[old:], members[old:])
                self._placed_tables[key] = table
                placed = table.view(len(members))
            self._placed[key] = placed
            return placed

    @abstractmethod
    def linear_scores(self, module: str, hidden: torch.Tensor) -> torch.Tensor:
        """Each token's projection onto the module's expert vectors: ``[N, d_in] -> [N, E_m]``,
        a new tensor (routing may overwrite it)."""

    def scores(self, module: str, hidden: torch.Tensor) -> torch.Tensor:
        """Routing scores of each token against the module's experts: ``[N, d_in] -> [N, E_m]``,
        a new tensor (routing may overwrite it)."""
        scores = self.linear_scores(module, hidden)
        return scores.abs_() if self.absolute_scores else scores

    def route_tokens(
        self, module: str, hidden: torch.Tensor, top_k: int | None = None
    ) -> RoutingDecision:
        """Route each token at one module among the experts that adapt it: top-k softmax of
        :meth:`linear_scores`, indices in the router's expert order."""
        vectors, members = self._placed_for(module, hidden)
        if hidden.ndim != 2 or hidden.shape[1] != vectors.shape[1]:
            raise ValueError(
                f"module {module!r} expects hidden states [N, {vectors.shape[1]}], "
                f"got {tuple(hidden.shape)}"
            )
        k = self._resolve_top_k(top_k, num_candidates=len(members))
        linear = self.linear_scores(module, hidden)
        kept = topk_triton.try_top_k_softmax(  # CUDA: |score|, top-k, softmax, ids in one kernel
            linear, k, self.temperature, absolute=self.absolute_scores, members=members
        )
        if kept is not None:
            return RoutingDecision(indices=kept[0], weights=kept[1])
        scores = linear.abs_() if self.absolute_scores else linear
        local = top_k_softmax(scores, k, self.temperature, scratch=True)
        return RoutingDecision(indices=members[local.indices], weights=local.weights)

    def zero_vector_experts(self) -> list[str]:
        """Experts whose vector is zero in every module: the router knows nothing about them.

        An Arrow prototype is zero when the expert's LoRA update ``B A`` is zero (a LoRA left at
        its initialisation, ``B = 0``, e.g. when training kept the linear probe's start): Arrow
        scores ``|<h, 0>| = 0`` and never picks it first. A PHATGOOSE gate stays at its zero
        start when no gradient reaches it through such an update: every token scores 0, so the
        expert is picked exactly when all the other experts score below 0, for no reason of its
        own.
        """
        informed: set[int] = set()
        for module, vectors in self.vectors.items():
            nonzero = vectors.abs().amax(dim=1) > 0  # [E_m]
            informed.update(self.members[module][nonzero].tolist())
        return [e for i, e in enumerate(self.expert_ids) if i not in informed]

    def vector_similarity(self, max_experts: int = 1024, seed: int = 0) -> dict[str, float]:
        """Mean and max ``|cos|`` between different experts' vectors, over all modules.

        Modules with more than ``max_experts`` experts are measured on a seeded random subset
        of that many (the full ``E x E`` matrix would cost ``O(E^2)`` memory).
        """
        means, maxes = [], []
        generator = torch.Generator().manual_seed(seed)
        for vectors in self.vectors.values():
            if len(vectors) > max_experts:
                vectors = vectors[torch.randperm(len(vectors), generator=generator)[:max_experts]]
            if len(vectors) < 2:
                continue
            unit = F.normalize(vectors, dim=-1)
            cos = (unit @ unit.T).abs()
            off = cos[~torch.eye(len(vectors), dtype=torch.bool)]
            means.append(float(off.mean()))
            maxes.append(float(off.max()))
        if not means:
            return {}
        return {"mean_abs_cos": sum(means) / len(means), "max_abs_cos": max(maxes)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per module, the expert vectors and which experts they belong to."""
        state: dict[str, torch.Tensor] = {}
        for module in self.modules:
            state[VECTORS_PREFIX + module] = self.vectors[module]
            state[MEMBERS_PREFIX + module] = self.members[module]
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`; placed copies of the tables are dropped."""
        modules = sorted(k[len(VECTORS_PREFIX) :] for k in state if k.startswith(VECTORS_PREFIX))
        self.vectors, self.members, self._tables = {}, {}, {}
        for module in modules:
            vectors = state[VECTORS_PREFIX + module].to(torch.float32)
            members = state[MEMBERS_PREFIX + module].to(torch.long)
            self._set_table(module, ExpertTable.of(vectors, members), len(members))
        self._forget_placements()


def _stacked(
    module: str, rows: Sequence[tuple[int, torch.Tensor]], after: torch.Tensor | None = None
) -> torch.Tensor:
    """``[(expert index, vector [d_in]), ...]`` -> float32 table [len(rows), d_in], checked to
    agree on ``d_in`` with each other and with the table ``after`` [E, d_in] they extend."""
    dims = {int(v.shape[-1]) for _, v in rows}
    if after is not None:
        dims.add(int(after.shape[1]))
    if len(dims) != 1:
        raise ValueError(f"module {module!r}: experts disagree on its input size {dims}")
    return torch.stack([v.to(torch.float32) for _, v in rows])
