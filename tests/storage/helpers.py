"""Helpers shared by the storage tests: sample experts and a dump of every table."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select

from moerge.storage.blobstore import BlobStore
from moerge.storage.models import Base
from moerge.storage.records import NewExpert, StatisticsSummary

ADMIN = "admin:test"


def new_expert(
    blobs: BlobStore, name: str = "sentiment", content: bytes | None = None, **changes: Any
) -> NewExpert:
    """A valid expert whose files are in ``blobs``; ``content`` varies the adapter weights
    (by default they depend on the name: identical content is one expert per contributor)."""
    files = {
        "adapter_config.json": blobs.put_bytes(b'{"r": 8}'),
        "adapter_model.safetensors": blobs.put_bytes(
            f"weights of {name}".encode() if content is None else content
        ),
        "statistics.json": blobs.put_bytes(b'{"example_count": 100}'),
    }
    fields: dict[str, Any] = {
        "name": name,
        "task_name": "sst2",
        "task_description": "Movie review sentiment.\nBinary labels.",
        "task_type": "classification",
        "base_model_id": "sentence-transformers/all-MiniLM-L6-v2",
        "lora_rank": 8,
        "target_modules": ["query", "value"],
        "label_names": ["negative", "positive"],
        "example_count": 100,
        "files": files,
        "statistics": StatisticsSummary(
            hidden_size=384,
            covariance_rank=16,
            gate_modules=12,
            dp={"epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0},
            summary={"label_counts": [50, 50]},
        ),
    }
    fields.update(changes)
    return NewExpert(**fields)


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every registry table, in primary-key order."""
    with engine.connect() as connection:
        return {
            table.name: [
                tuple(row)
                for row in connection.execute(select(table).order_by(*table.primary_key.columns))
            ]
            for table in Base.metadata.sorted_tables
        }
