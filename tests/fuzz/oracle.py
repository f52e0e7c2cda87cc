"""The oracle every fuzz case must pass: a proper error status, a live server, nothing changed.

A refused call must return a specific gRPC status (never OK, UNKNOWN or INTERNAL, never a
timeout or UNAVAILABLE, which would mean a hang or a crash) with a message; afterwards the
health service must still answer and the registry (every row of every table, audit log
included) and the blob store (every file's sha256) must be byte-for-byte what they were.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import JSON, MetaData

#: Codes that say "your request was refused" (as opposed to "the server broke").
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


class Defect(AssertionError):
    """A fuzz case broke the oracle."""


@dataclass(frozen=True)
class Snapshot:
    """Every row of every table as the database returns it, and each blob's sha256 by path."""

    columns: dict[str, tuple[str, ...]]
    rows: dict[str, frozenset[tuple[Any, ...]]]
    blobs: dict[str, str] = field(default_factory=dict)

    def changes(self, after: Snapshot) -> dict[str, tuple[list[dict[str, Any]], list[dict]]]:
        """Per table: (rows added, rows removed), as dicts; blobs under the key ``"<blobs>"``."""
        out: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        if self.rows != after.rows:
            for table in sorted(set(self.rows) | set(after.rows)):
                old, new = self.rows.get(table, frozenset()), after.rows.get(table, frozenset())
                if old != new:
                    cols = after.columns.get(table) or self.columns[table]
                    out[table] = (
                        [dict(zip(cols, r, strict=True)) for r in sorted(new - old, key=repr)],
                        [dict(zip(cols, r, strict=True)) for r in sorted(old - new, key=repr)],
                    )
        if self.blobs != after.blobs:
            added = [{"path": p} for p in sorted(set(after.blobs) - set(self.blobs))]
            changed = [
                {"path": p} for p in sorted(self.blobs) if after.blobs.get(p) != self.blobs[p]
            ]
            out["<blobs>"] = (added, changed)
        return out


def _as_stored(column: str, type_: Any) -> str:
    """JSON as its stored text: psycopg would decode it to (unhashable) dicts and lists."""
    return f"CAST({column} AS TEXT)" if isinstance(type_, JSON) else column


class Snapshotter:
    """Reflects the schema once, then reads every raw row and hashes every blob on each call.

    Rows are compared as the driver returns them (JSON as text, times as strings), which is
    stricter than comparing decoded values and keeps a snapshot cheap enough for every case.
    """

    def __init__(self, state: Any) -> None:
        self.state = state
        self.last: Snapshot | None = None
        metadata = MetaData()
        metadata.reflect(bind=state.engine)
        quote = state.engine.dialect.identifier_preparer.quote
        self.queries: dict[str, tuple[tuple[str, ...], str]] = {}
        for name, table in sorted(metadata.tables.items()):
            if name == "alembic_version":
                continue
            # last_used_at moves on every authenticated call: bookkeeping, not state.
            columns = [c for c in table.columns if c.name != "last_used_at"]
            cols = tuple(c.name for c in columns)
            sql = f"SELECT {', '.join(_as_stored(quote(c.name), c.type) for c in columns)} "
            sql += f"FROM {quote(name)}"
            self.queries[name] = (cols, sql)

    def __call__(self) -> Snapshot:
        rows = {}
        with self.state.engine.connect() as conn:
            for name, (_, sql) in self.queries.items():
                rows[name] = frozenset(tuple(r) for r in conn.exec_driver_sql(sql).fetchall())
        blobs = {}
        root = Path(self.state.blobs.root)
        for path in sorted(root.rglob("*")):
            if path.is_file():
                blobs[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        columns = {name: cols for name, (cols, _) in self.queries.items()}
        self.last = Snapshot(columns, rows, blobs)
        return self.last

    def before(self) -> Snapshot:
        """The snapshot taken after the previous case: nothing else writes between cases."""
        return self.last if self.last is not None else self()


def check_refused(error: grpc.RpcError, case: object) -> grpc.StatusCode:
    """A refusal must carry a specific code and a message."""
    code = error.code()
    if code not in REFUSALS:
        raise Defect(f"{case!r}: status {code} ({error.details()!r}) is not a proper refusal")
    if not (error.details() or "").strip():
        raise Defect(f"{case!r}: status {code} carries no message")
    return code


def check_alive(channel: grpc.Channel) -> None:
    """The server still answers its health check."""
    status = (
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        .status
    )
    if status != health_pb2.HealthCheckResponse.SERVING:
        raise Defect(f"health check says {status}")


def check_unchanged(before: Snapshot, after: Snapshot, case: object) -> None:
    changes = before.changes(after)
    if changes:
        raise Defect(f"{case!r}: a refused call changed the store: {changes}")


def check_blobs_verify(state: Any) -> None:
    """Every stored blob still matches its digest (used after a case that was accepted)."""
    for sha in state.blobs.iter_blobs():
        if not state.blobs.verify(sha):
            raise Defect(f"blob {sha} no longer matches its digest")


#: What a refused upload may leave in the registry: its own upload row (so that the client can
#: resume it or read why it was refused) and the audit entries saying so. No expert, no blob.
UPLOAD_BOOKKEEPING_ACTIONS = frozenset({"upload.begin", "upload.fail"})


def only_upload_bookkeeping(before: Snapshot, after: Snapshot) -> bool:
    changes = before.changes(after)
    if set(changes) - {"uploads", "audit_log"}:
        return False
    added_uploads, _ = changes.get("uploads", ([], []))
    if any(row["state"] == "committed" or row["expert_id"] for row in added_uploads):
        return False
    added_audit, removed_audit = changes.get("audit_log", ([], []))
    return not removed_audit and all(
        row["action"] in UPLOAD_BOOKKEEPING_ACTIONS for row in added_audit
    )
