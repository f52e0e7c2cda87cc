"""Named, versioned few-shot compositions in the registry (table ``compositions``, migration 0003).

A composition is what a LoraHub-style search (:mod:`moerge.router_training.composition`) found:
signed merge weights over registered experts. Saving a name that exists adds its next version,
as experts do; Predict and Generate pin a composition by name (newest version) or name and
version. The user's examples are stored only when asked (``keep_examples``).

Kept beside :class:`~moerge.storage.registry.Registry` (whose sessions, audit log and
generation counter it shares) rather than inside it, so that one file holds one idea.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import uuid4

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from moerge.refusals import AlreadyExists, InvalidArgument, NotFound
from moerge.storage.models import Composition, Expert
from moerge.storage.records import CompositionInfo, Page
from moerge.storage.registry import Registry, utcnow
from moerge.storage.validation import MAX_INT32, check_name, check_page_size

MAX_EXPERTS = 1024


class CompositionStore:
    """Create, read and list compositions through ``registry``'s transactions."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def create(
        self,
        actor: str,
        name: str,
        expert_ids: Sequence[str],
        weights: Sequence[float],
        label_names: Sequence[str],
        search: Mapping[str, Any],
        examples: Sequence[tuple[str, str]] | None = None,
    ) -> CompositionInfo:
        """Store the next version of ``name``; ``examples`` only when the user keeps them."""
        name = check_name("name", name)
        if not 1 <= len(expert_ids) <= MAX_EXPERTS or len(set(expert_ids)) != len(expert_ids):
            raise InvalidArgument("expert_ids", f"1..{MAX_EXPERTS} distinct expert ids")
        if len(weights) != len(expert_ids) or not all(math.isfinite(w) for w in weights):
            raise InvalidArgument("weights", "one finite weight per expert")
        for _ in range(3):  # two writers may race for the same next version
            try:
                with self.registry._write() as session:
                    known = set(
                        session.scalars(select(Expert.id).where(Expert.id.in_(list(expert_ids))))
                    )
                    missing = [e for e in expert_ids if e not in known]
                    if missing:
                        raise NotFound(f"expert {missing[0]} not found")
                    latest = session.scalar(
                        select(func.max(Composition.version)).where(Composition.name == name)
                    )
                    row = Composition(
                        id=uuid4().hex,
                        name=name,
                        version=(latest or 0) + 1,
                        expert_ids=list(expert_ids),
                        weights=[float(w) for w in weights],
                        label_names=list(label_names),
                        search=dict(search),
                        examples=None
                        if examples is None
                        else [{"text": t, "label": y} for t, y in examples],
                        created_by=actor,
                        created_at=utcnow(),
                    )
                    session.add(row)
                    session.flush()
                    self.registry._audit(
                        session,
                        actor,
                        "composition.create",
                        "composition",
                        row.id,
                        {
                            "name": name,
                            "version": row.version,
                            "experts": len(expert_ids),
                            "examples_kept": examples is not None,
                        },
                    )
                    return _info(row)
            except IntegrityError:
                continue
        raise AlreadyExists(f"composition {name!r}: concurrent versions; retry")

    def get(self, name: str, version: int = 0) -> CompositionInfo:
        """Version ``version`` of ``name``, or its newest version when ``version`` is 0."""
        name = check_name("name", name)
        if not 0 <= version <= MAX_INT32:
            raise InvalidArgument("version", f"must be in 0..{MAX_INT32} (0: the newest)")
        query = select(Composition).where(Composition.name == name)
        if version:
            query = query.where(Composition.version == version)
        with self.registry._read() as session:
            row = session.scalars(query.order_by(Composition.version.desc()).limit(1)).first()
            if row is None:
                which = f" version {version}" if version else ""
                raise NotFound(f"composition {name!r}{which} not found")
            return _info(row)

    def list(self, name: str = "", page_size: int = 100) -> Page[CompositionInfo]:
        """Compositions (every version), newest first; only ``name``'s when it is given."""
        page_size = check_page_size(page_size)
        query = select(Composition)
        if name:
            query = query.where(Composition.name == check_name("name", name))
        with self.registry._read() as session:
            rows = session.scalars(
                query.order_by(Composition.created_at.desc(), Composition.version.desc()).limit(
                    page_size
                )
            )
            return Page(tuple(_info(row) for row in rows), None)


def _info(row: Composition) -> CompositionInfo:
    return CompositionInfo(
        id=row.id,
        name=row.name,
        version=row.version,
        expert_ids=tuple(row.expert_ids),
        weights=tuple(float(w) for w in row.weights),
        label_names=tuple(row.label_names),
        search=dict(row.search),
        examples=tuple((e["text"], e["label"]) for e in row.examples or ()),
        created_by=row.created_by,
        created_at=row.created_at,
    )
