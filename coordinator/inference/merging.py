"""Per-input merges of experts, written into temporary bank slots for one batch.

A merge aggregation gives every input of a batch one adapter built from its k experts:

* ``linear``: ``sum_j w_j B_j A_j``. The bank computes it exactly by routing the row to the k
  slots with weights ``w`` [B, k]; nothing is written.
* ``ties``, ``dare_linear``, ``dare_ties``: PEFT's merge of the LoRA factors
  (:func:`~.aggregation.merge_lora_factors`), one per distinct (experts, weights) combination
  of the batch, written into a temporary slot (id ``RESERVED_PREFIX + n``, outside the cache
  budget) and removed when the batch is done. DARE prunes at random: the generator is seeded
  from ``(MergeOptions.seed, combination)``, so an input gets the same merge whatever batch
  it is in.

Worker thread only, like every bank change.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from moerge.coordinator.inference.aggregation import LoraFactors, merge_lora_factors
from moerge.coordinator.inference.cache import RESERVED_PREFIX, LoadedExpert
from moerge.coordinator.inference.forward import Forward
from moerge.coordinator.inference.plan import MergeOptions

#: Per expert, its ``module -> (A, B, scaling)``, read back from the bank once per batch.
FactorCache = dict[str, dict[str, LoraFactors]]


class MergedSlots:
    """Temporary bank slots holding merged adapters (see the module docstring)."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self._counter = 0  # ids of temporary slots: unique over the engine's life

    def add(
        self,
        ids: Sequence[str],
        weights: Sequence[float],
        method: str,
        merge: MergeOptions,
        experts: dict[str, LoadedExpert],
        factors: FactorCache | None = None,
    ) -> tuple[str, int]:
        """Write PEFT's ``method`` merge of ``ids`` into a temporary slot: (its id, its slot).

        The caller removes it with ``bank.remove_expert(id)``; ``factors`` caches experts'
        factors across calls.
        """
        bank = self.forward.bank
        factors = {} if factors is None else factors
        for e in ids:
            if e not in factors:
                factors[e] = experts[e].factors(bank)
        key = combination_key(ids, weights)
        with seeded(merge.seed, key, "lora", self.forward.device):
            merged = merge_experts([factors[e] for e in ids], list(weights), method, merge)
        self._counter += 1
        temp_id = f"{RESERVED_PREFIX}{self._counter}"
        return temp_id, bank.add_expert(temp_id, merged)

    @contextmanager
    def routing(
        self,
        rows: list[tuple[tuple[str, ...], list[float]]],
        method: str,
        merge: MergeOptions,
        experts: dict[str, LoadedExpert],
    ) -> Iterator[None]:
        """Route each row (its expert ids and weights) to its merged adapter inside the block.

        ``linear``: the bank's example routing over the k slots (exact). Other methods: one
        temporary slot per distinct combination, removed on exit.
        """
        forward = self.forward
        if method == "linear":
            slots = forward.slots([[experts[e].slot for e in ids] for ids, _ in rows])  # [B, k]
            row_weights = torch.tensor(
                [w for _, w in rows], dtype=forward.dtype, device=forward.device
            )  # [B, k]
            with forward.bank.route_examples(slots, row_weights):
                yield
            return
        temporary: list[str] = []
        slot_by_key: dict[tuple[object, ...], int] = {}
        factors: FactorCache = {}
        try:
            row_slots = []
            for ids, weights in rows:
                key = combination_key(ids, weights)
                if key not in slot_by_key:
                    temp_id, slot_by_key[key] = self.add(
                        ids, weights, method, merge, experts, factors
                    )
                    temporary.append(temp_id)
                row_slots.append([slot_by_key[key]])
            with forward.one_expert_per_row(forward.slots(row_slots)):  # [B, 1]
                yield
        finally:
            for temp_id in temporary:
                forward.bank.remove_expert(temp_id)


def combination_key(ids: Sequence[str], weights: Sequence[float]) -> tuple[object, ...]:
    """Inputs with equal keys get the same merge: the experts and their rounded weights."""
    return (*ids, *(round(float(w), 6) for w in weights))


@contextmanager
def seeded(seed: int, key: tuple[object, ...], salt: str, device: torch.device) -> Iterator[None]:
    """Seed torch's RNGs from (seed, combination) so DARE does not depend on batching."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(zlib.crc32(repr((seed, key, salt)).encode()))
        yield


def merge_experts(
    factors: list[dict[str, LoraFactors]],
    weights: list[float],
    method: str,
    merge: MergeOptions,
) -> dict[str, LoraFactors]:
    """One merged adapter per module of any chosen expert (PEFT ``add_weighted_adapter``).

    ``factors[j]``: expert j's ``module -> (A, B, scaling)``; an expert that does not adapt a
    module takes no part in that module's merge, as in PEFT.
    """
    merged = {}
    for module in dict.fromkeys(m for f in factors for m in f):
        present = [(f[module], w) for f, w in zip(factors, weights, strict=True) if module in f]
        merged[module] = merge_lora_factors(
            [p for p, _ in present],
            [w for _, w in present],
            method,
            merge.density,
            merge.majority_sign_method,
        )
    return merged
