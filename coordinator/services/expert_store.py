"""Read registered experts back out of the blob store, for routers and the inference engine.

Experts are materialised once into ``<data>/experts/<expert_id>/`` (:meth:`BlobStore.fetch`:
hard links to the verified blobs of a local store when the file system allows, verified
downloads from an object store) so that PEFT-format readers see an ordinary adapter folder.
Statistics are parsed into :class:`~moerge.router_training.base.ExpertRecord`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from safetensors.torch import load_file

from moerge.expert_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    COV_DIAG_KEY,
    COV_FACTOR_KEY,
    GATE_PREFIX,
    MEAN_KEY,
    STATISTICS_META,
    STATISTICS_TENSORS,
    StatisticsMeta,
)
from moerge.router_training.base import ExpertRecord, ExpertStatistics, LoraModuleWeights
from moerge.storage.blobstore import BlobCorrupted, BlobStore
from moerge.storage.records import ExpertInfo


class ExpertStore:
    """Materialises experts from verified blobs; thread-safe."""

    def __init__(self, blobs: BlobStore, root: Path) -> None:
        self.blobs = blobs
        self.root = Path(root)
        self._lock = threading.Lock()

    def folder(self, expert: ExpertInfo) -> Path:
        """The expert's files as a folder (verified against their sha256 when first written)."""
        target = self.root / expert.id
        with self._lock:
            if (target / ".complete").exists():
                return target
            staging = target.with_name(target.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for name, ref in expert.files.items():
                try:
                    self.blobs.fetch(ref.sha256, staging / name)
                except BlobCorrupted:
                    raise OSError(f"blob {ref.sha256} of expert {expert.id} is corrupted") from None
            (staging / ".complete").touch()
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            return target

    def statistics(self, digests: dict[str, str]) -> ExpertStatistics | None:
        """An expert's statistics from its two statistics blobs alone (``{file name: sha256}``),
        verified; the LoRA weights, hundreds of MiB, are neither hashed nor materialised."""
        with tempfile.TemporaryDirectory() as tmp:
            for name in (STATISTICS_META, STATISTICS_TENSORS):
                digest = digests[name]
                try:
                    self.blobs.fetch(digest, Path(tmp) / name)
                except BlobCorrupted:
                    raise OSError(f"statistics blob {digest} ({name}) is corrupted") from None
            return read_statistics(Path(tmp))

    def forget(self, expert_id: str) -> None:
        """Drop an expert's unpacked local copy (a deleted expert); missing is fine."""
        shutil.rmtree(self.root / expert_id, ignore_errors=True)

    def record(self, expert: ExpertInfo) -> ExpertRecord:
        """Statistics now, LoRA weights lazily (routers over thousands of experts stream them)."""
        folder = self.folder(expert)
        return ExpertRecord(
            expert_id=expert.id,
            task_name=expert.task_name,
            statistics=read_statistics(folder),
            load_lora=lambda: read_lora(folder),
        )


def read_statistics(folder: Path) -> ExpertStatistics | None:
    """The expert's statistics, or None for an adapter-only expert (it has none)."""
    meta = StatisticsMeta.read(folder / STATISTICS_META)
    if not meta.embedding_statistics:
        return None
    tensors = load_file(str(folder / STATISTICS_TENSORS))
    gates = {
        k[len(GATE_PREFIX) :]: v.float() for k, v in tensors.items() if k.startswith(GATE_PREFIX)
    }
    return ExpertStatistics(
        example_count=meta.example_count,
        mean=tensors[MEAN_KEY].float(),
        cov_diag=tensors[COV_DIAG_KEY].float(),
        cov_factor=tensors[COV_FACTOR_KEY].float(),
        gates=gates,
        label_names=list(meta.label_names),
        dp_noise_std=dict(meta.dp.noise_std) if meta.dp else {},
    )


def read_lora(folder: Path) -> dict[str, LoraModuleWeights]:
    """PEFT LoRA factors keyed by module path in the base model (head tensors skipped).

    A classification adapter was trained on a task wrapper (``BertForSequenceClassification``)
    whose encoder sits under one more name (``bert.encoder...``); that first component is
    dropped so that every router and the engine name modules as the base model does.
    """
    from moerge.coordinator.inference.lora_bank import LoraBank

    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    weights = LoraBank.lora_weights_from_peft(state, config)
    wrapped = config.get("task_type") == "SEQ_CLS"
    return {
        (name.split(".", 1)[1] if wrapped else name): LoraModuleWeights(
            A=a.float(), B=b.float(), scaling=float(s)
        )
        for name, (a, b, s) in weights.items()
    }
