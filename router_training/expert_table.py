"""One module's expert table that grows at the end: appending experts costs O(new rows).

A token-level router keeps, per adapted module, expert vectors ``V`` [E, d_in] and the global
index of each row's expert, ``members`` [E] (:mod:`.token_router`). It keeps them twice: the
float32 master table (on CPU in the coordinator; saved with the router) and a copy on the
hidden states' device in their dtype (bf16 on a GPU), which every routed token reads.

When a per-expert method (Arrow) adds experts without a refit, the new router's table is the
old one followed by the new rows. Concatenating would copy all ``E`` rows, and placing the new
router on the GPU would copy them again from the host (88 modules x 1,024 x 2,048 floats for a
1.1B model: 0.74 GB). Instead an :class:`ExpertTable` holds a buffer with spare rows
(``capacity >= filled``), and every router holds a *view* of its first ``E`` rows. Extending
writes the new rows into the spare capacity, in place, so the old router's view (rows
``[0, E)``) and the new router's (rows ``[0, E + n)``) share one buffer; rows once written are
never changed. When there is no room, or another router already appended past row ``E`` (the
same router extended twice), the first ``E`` rows are copied into a new buffer of
``GROWTH`` times the rows; over many appends each row is copied a constant number of times
on average (geometric growth, as a Python list or a Java ``ArrayList``).

A view is a contiguous prefix ``buffer[:E]`` with the strides of a fresh ``[E, d_in]`` tensor,
so scores computed from it are bit-identical to scores from a freshly built table.
"""

from __future__ import annotations

import math
import threading

import torch

#: capacity of a new buffer, as a multiple of the rows it must hold: 1.5 (as Java's
#: ``ArrayList``) leaves at most a third of the buffer unused and copies each row at most
#: three times on average over any sequence of appends (doubling: half unused, twice).
GROWTH = 1.5


class ExpertTable:
    """A buffer of expert rows, ``vectors`` [capacity, d_in] and ``members`` [capacity] (int64),
    of which the first ``filled`` are written. Routers hold views of a prefix (:meth:`view`)."""

    def __init__(self, vectors: torch.Tensor, members: torch.Tensor, filled: int) -> None:
        if vectors.ndim != 2 or members.shape != vectors.shape[:1] or filled > len(members):
            raise ValueError(
                f"need vectors [C, d_in] and members [C] holding {filled} rows, got "
                f"{tuple(vectors.shape)} and {tuple(members.shape)}"
            )
        self._vectors = vectors
        self._members = members
        self._filled = filled
        self._lock = threading.Lock()  # guards _filled: two routers may append at once

    @classmethod
    def of(
        cls,
        vectors: torch.Tensor,
        members: torch.Tensor,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ExpertTable:
        """A full table holding ``vectors`` [E, d_in] and ``members`` [E], on ``device`` and in
        ``dtype`` (default: theirs). Copies only when the device or dtype differ."""
        device = vectors.device if device is None else device
        dtype = vectors.dtype if dtype is None else dtype
        return cls(vectors.to(device, dtype), members.to(device, torch.long), len(members))

    @property
    def capacity(self) -> int:
        """How many expert slots the table holds, used or not."""
        return len(self._members)

    def view(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``rows`` rows: ``(vectors [rows, d_in], members [rows])``, no copy."""
        if rows > self._filled:
            raise ValueError(f"table holds {self._filled} rows, not {rows}")
        return self._vectors[:rows], self._members[:rows]

    def appended(self, rows: int, vectors: torch.Tensor, members: torch.Tensor) -> ExpertTable:
        """A table whose first ``rows + n`` rows are this table's first ``rows`` followed by
        ``vectors`` [n, d_in] and ``members`` [n] (converted to this table's device and dtype).

        In place when row ``rows`` is this table's end (nobody appended past it) and the new
        rows fit: ``O(n)``. Otherwise a new buffer of capacity ``GROWTH * (rows + n)``, into
        which the first ``rows`` rows are copied on this table's device: ``O(rows)``, once per
        growth. Rows ``[0, rows)`` are never written, so views of them stay valid either way.
        """
        total = rows + len(members)
        with self._lock:
            in_place = rows == self._filled and total <= self.capacity
            if in_place:
                self._filled = total  # claimed: a concurrent append from `rows` now copies
        if in_place:
            table = self
        else:
            old_vectors, old_members = self.view(rows)
            capacity = max(total, math.ceil(GROWTH * total))
            table = ExpertTable(
                old_vectors.new_empty(capacity, old_vectors.shape[1]),
                old_members.new_empty(capacity),
                filled=total,
            )
            table._vectors[:rows].copy_(old_vectors)
            table._members[:rows].copy_(old_members)
        table._vectors[rows:total].copy_(vectors)
        table._members[rows:total].copy_(members)
        return table
