"""Process helpers shared by tests and benchmarks (Linux procfs)."""

from __future__ import annotations

from pathlib import Path


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``, from every thread's ``children`` list (a
    coordinator's engine process with ``predict_process``, multiprocessing's helpers)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # a thread that has ended
            continue
    return found
