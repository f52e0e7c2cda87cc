"""A byte-for-byte picture of the registry and blob store: refused calls must change nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, select


def snapshot(state: Any) -> dict[str, Any]:
    """Every row of every table (audit log included) and the digest of every stored file."""
    metadata = MetaData()
    metadata.reflect(bind=state.engine)
    rows: dict[str, Any] = {}
    with state.engine.connect() as conn:
        for name, table in sorted(metadata.tables.items()):
            if name == "alembic_version":
                continue
            # last_used_at moves on every authenticated call; it is bookkeeping, not state.
            columns = [c for c in table.columns if c.name != "last_used_at"]
            result = conn.execute(select(*columns)).all()
            rows[name] = sorted(repr(tuple(r)) for r in result)
    files = {}
    root = Path(state.blobs.root)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"rows": rows, "blobs": files}
