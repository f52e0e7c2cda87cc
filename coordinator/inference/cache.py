"""Keep the experts in use resident, within a byte budget, loading the rest on demand.

An expert is loaded from the folder its ``loader(expert_id) -> Path`` returns (the coordinator
materialises it from the blob store): the PEFT adapter is parsed with
:meth:`LoraBank.lora_weights_from_peft`, the head (classification) with :mod:`.heads`, and the
LoRA factors enter the bank with :meth:`LoraBank.add_expert`. Eviction is
:meth:`LoraBank.remove_expert`, least recently used first, whenever the resident bytes exceed the
budget.

An expert's bytes are what the bank reports for it (:meth:`LoraBank.nbytes_of`: one slot in
every module, padded to ``max_rank``) plus its head. No second copy of the factors is kept:
per-input TIES/DARE merging reads them back from the bank (:meth:`LoadedExpert.factors`).

Experts pinned by the batch being executed are never evicted. A batch that needs more than the
budget on its own still runs: the cache goes over budget for that batch and trims back as soon
as it is released. The cache is driven by the engine's single worker thread; a lock makes
every method safe to call from other threads as well.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moerge.coordinator.inference.aggregation import LoraFactors
from moerge.coordinator.inference.errors import IncompatibleExpert, UnknownExpert
from moerge.coordinator.inference.heads import (
    ClassificationHead,
    head_from_state_dict,
    read_label_names,
)
from moerge.coordinator.inference.lora_bank import LoraBank
from moerge.expert_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS

ExpertLoader = Callable[[str], Path]

#: Ids of the engine's temporary merged adapters; never accepted from a loader.
RESERVED_PREFIX = "__moerge_tmp__/"

#: Bank slots kept beyond a router's experts by :meth:`ExpertCache.reserve_for`, for the
#: temporary slots of per-request merges (TIES/DARE)
SPARE_SLOTS = 4


@dataclass(frozen=True)
class ExpertFiles:
    """An expert parsed from its folder, before it enters the bank."""

    factors: dict[str, LoraFactors]  # module path -> (A [r, d_in], B [d_out, r], scaling), CPU
    head: ClassificationHead | None  # classification experts only, on CPU


@dataclass(frozen=True)
class LoadedExpert:
    """A resident expert: its bank slot, its modules' ranks and scalings, its head, its size."""

    expert_id: str
    slot: int
    modules: dict[str, tuple[int, float]]  # bank module name -> (rank, scaling)
    head: ClassificationHead | None  # on the engine's device
    nbytes: int

    def factors(self, bank: LoraBank) -> dict[str, LoraFactors]:
        """The expert's own (A, B, scaling) per bank module, read back from its slot (float32).

        The bank stores ``scaling * B`` zero-padded to ``max_rank``; this undoes both.
        """
        out = {}
        for name, (rank, scaling) in self.modules.items():
            module = bank.modules[name]
            a = module.A[self.slot, :rank].float()  # [r, d_in]
            b = module.B[self.slot, :, :rank].float()  # [d_out, r], scaling folded in
            out[name] = (a, b / scaling, scaling) if scaling else (a, b, 1.0)
        return out


def bank_module_name(modules: Sequence[str], name: str) -> str | None:
    """The bank module ``name`` refers to: exact, else the unique dotted-suffix match either way.

    Adapter files and routers may name a module with the task model's prefix
    (``bert.encoder.layer.0.attention.self.query``) while the bank wraps the bare base model
    (``encoder.layer.0.attention.self.query``), or the other way round.
    """
    if name in modules:
        return name
    hits = [m for m in modules if m.endswith("." + name) or name.endswith("." + m)]
    return hits[0] if len(hits) == 1 else None


def read_expert(folder: str | Path, classification: bool, hidden_size: int) -> ExpertFiles:
    """Parse an expert folder (safetensors + JSON only) into factors and head."""
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except FileNotFoundError as exc:
        missing = Path(str(exc.filename)).name
        raise IncompatibleExpert(f"expert folder {folder} lacks {missing}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as exc:
        raise IncompatibleExpert(f"expert folder {folder} is unreadable: {exc}") from None
    try:
        weights = LoraBank.lora_weights_from_peft(state, config)
    except (KeyError, ValueError) as exc:
        raise IncompatibleExpert(f"expert folder {folder}: {exc}") from None
    factors = {
        name: (a.detach().float().contiguous(), b.detach().float().contiguous(), float(s))
        for name, (a, b, s) in weights.items()
    }
    head = None
    if classification:
        head = head_from_state_dict(state, read_label_names(folder), hidden_size)
    return ExpertFiles(factors, head)


class ExpertCache:
    """LRU cache of experts in a :class:`LoraBank`, bounded by ``budget_bytes``."""

    def __init__(
        self,
        bank: LoraBank,
        loader: ExpertLoader | None,
        budget_bytes: int,
        *,
        classification: bool,
        hidden_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self.bank = bank
        self.loader = loader
        self.budget_bytes = int(budget_bytes)
        self.classification = classification
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.dtype = dtype
        self._lock = threading.RLock()
        self._resident: OrderedDict[str, LoadedExpert] = OrderedDict()  # LRU first
        self._pins: Counter[str] = Counter()
        self.hits = 0
        self.loads = 0
        self.evictions = 0
        self._reserved_for = 0  # the largest expert count reserve_for has made room for

    # -- inspection ---------------------------------------------------------------------------
    @property
    def resident_ids(self) -> list[str]:
        """Resident experts, least recently used first."""
        with self._lock:
            return list(self._resident)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the experts loaded in the bank now."""
        with self._lock:
            return sum(e.nbytes for e in self._resident.values())

    def __contains__(self, expert_id: object) -> bool:
        with self._lock:
            return expert_id in self._resident

    def stats(self) -> dict[str, int]:
        """Counters for /metrics and tests: residents, bytes, budget, hits, loads and evictions."""
        with self._lock:
            return {
                "resident": len(self._resident),
                "resident_bytes": self.resident_bytes,
                "budget_bytes": self.budget_bytes,
                "hits": self.hits,
                "loads": self.loads,
                "evictions": self.evictions,
            }

    # -- use ----------------------------------------------------------------------------------
    @contextmanager
    def acquire(self, expert_ids: Sequence[str]) -> Iterator[dict[str, LoadedExpert]]:
        """Load (if needed) and pin ``expert_ids`` for one batch; trim to budget afterwards."""
        wanted = list(dict.fromkeys(expert_ids))
        with self._lock:
            pinned: list[str] = []
            try:
                loaded = {}
                for expert_id in wanted:
                    loaded[expert_id] = self._get(expert_id)
                    self._pins[expert_id] += 1
                    pinned.append(expert_id)
                self._trim()
            except BaseException:
                self._unpin(pinned)
                raise
        try:
            yield loaded
        finally:
            with self._lock:
                self._unpin(pinned)

    def put(self, expert_id: str, folder: str | Path | None = None) -> LoadedExpert:
        """(Re)load ``expert_id`` now, from ``folder`` or the loader, replacing a resident copy.

        A resident copy is replaced in its bank slot only once the new files have been read and
        validated: if they do not fit, the old version stays in service.
        """
        with self._lock:
            if self._pins[expert_id]:
                raise RuntimeError(f"expert {expert_id!r} is in use by a running batch")
            files = self._read(expert_id, folder)
            old = self._resident.pop(expert_id, None)  # its slot stays until overwritten
            try:
                entry = self._install(expert_id, files)
            except BaseException:
                if old is not None:
                    self._resident[expert_id] = old
                raise
            self._trim()
            return entry

    def invalidate(self, expert_id: str) -> bool:
        """Drop a resident expert (the next use reloads it). Returns whether it was resident."""
        with self._lock:
            if self._pins[expert_id]:
                raise RuntimeError(f"expert {expert_id!r} is in use by a running batch")
            return self._drop(expert_id)

    def reserve_for(self, experts: int) -> None:
        """Grow the bank now to hold ``experts`` (a router's expert count, capped by what the
        budget holds) plus :data:`SPARE_SLOTS` for temporary merges.

        Without it the bank doubles (8 -> 16 -> 32 -> 64) as a router's experts are first used;
        each growth reallocates every module's buffers, and CUDA graphs captured against the old
        buffers must be captured again, under load. One growth, when the router's first request
        arrives, costs the same memory (the budget bounds both) without the recaptures.
        Worker thread only (growing moves the buffers that running batches read)."""
        if experts <= self._reserved_for:  # every admitted request asks: O(1) when done
            return
        with self._lock:
            slot_bytes = self._slot_bytes()
            fits = self.budget_bytes // slot_bytes if slot_bytes else experts
            target = min(int(experts), fits) + SPARE_SLOTS
            if target > self.bank.capacity:
                self.bank.reserve(target)
            self._reserved_for = int(experts)

    def set_budget(self, budget_bytes: int) -> None:
        """Change the byte budget, evicting unpinned experts at once if it shrank."""
        with self._lock:
            self.budget_bytes = int(budget_bytes)
            self._reserved_for = 0  # a larger budget may pay for more slots
            self._trim()

    # -- internals ----------------------------------------------------------------------------
    def _get(self, expert_id: str) -> LoadedExpert:
        entry = self._resident.get(expert_id)
        if entry is not None:
            self._resident.move_to_end(expert_id)
            self.hits += 1
            return entry
        return self._install(expert_id, self._read(expert_id, None))

    def _read(self, expert_id: str, folder: str | Path | None) -> ExpertFiles:
        if not isinstance(expert_id, str) or not expert_id or expert_id.startswith(RESERVED_PREFIX):
            raise UnknownExpert(str(expert_id))
        if folder is None:
            if self.loader is None:
                raise UnknownExpert(expert_id)
            try:
                folder = self.loader(expert_id)
            except (LookupError, FileNotFoundError):
                raise UnknownExpert(expert_id) from None
        return read_expert(folder, self.classification, self.hidden_size)

    def _install(self, expert_id: str, files: ExpertFiles) -> LoadedExpert:
        # make room first; callers trim again once it is pinned
        head_bytes = files.head.nbytes if files.head is not None else 0
        self._trim(extra=self._slot_bytes() + head_bytes)
        try:
            slot = self.bank.add_expert(expert_id, files.factors)
        except (KeyError, ValueError) as exc:
            raise IncompatibleExpert(
                f"expert {expert_id!r} does not fit the base model: {exc}"
            ) from exc
        head = files.head.to(self.device, self.dtype) if files.head is not None else None
        names = list(self.bank.modules)
        modules = {}
        for name, (a, _, scaling) in files.factors.items():
            resolved = bank_module_name(names, name)
            assert resolved is not None  # add_expert resolved it already
            modules[resolved] = (int(a.shape[0]), float(scaling))
        nbytes = self.bank.nbytes_of(expert_id) + (head.nbytes if head is not None else 0)
        entry = LoadedExpert(expert_id, slot, modules, head, nbytes)
        self._resident[expert_id] = entry
        self.loads += 1
        return entry

    def _slot_bytes(self) -> int:
        return sum(m.nbytes_per_slot() for m in self.bank.modules.values())

    def _drop(self, expert_id: str) -> bool:
        entry = self._resident.pop(expert_id, None)
        if entry is None:
            return False
        self.bank.remove_expert(expert_id)
        return True

    def _unpin(self, expert_ids: list[str]) -> None:
        for expert_id in expert_ids:
            self._pins[expert_id] -= 1
            if self._pins[expert_id] <= 0:
                del self._pins[expert_id]
        self._trim()

    def _trim(self, extra: int = 0) -> None:
        """Evict unpinned experts, least recently used first, until within budget."""
        total = sum(e.nbytes for e in self._resident.values()) + extra
        for expert_id in list(self._resident):
            if total <= self.budget_bytes:
                break
            if self._pins[expert_id]:
                continue
            total -= self._resident[expert_id].nbytes
            self._drop(expert_id)
            self.evictions += 1
