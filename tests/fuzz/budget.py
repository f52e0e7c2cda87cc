"""How many cases each fuzzer runs, and a tally of the cases actually executed.

The CI suite runs each fuzzer at its default weight on SQLite (about 1,200 cases in all) and
at a small weight on PostgreSQL (about 240: a second server is the slow part). A soak run
scales every fuzzer so that the total on each database is ``MOERGE_FUZZ_CASES``:

    MOERGE_FUZZ_CASES=10000 pytest -m soak tests/fuzz                   # both databases
    MOERGE_FUZZ_CASES=3000 pytest -m "soak and postgres" tests/fuzz     # PostgreSQL only
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

#: Cases per fuzzer in the CI suite; a soak run keeps the proportions.
CI_CASES: dict[str, int] = {
    "rpc_property": 350,
    "rpc_mutation": 400,
    "upload_grpc": 100,
    "upload_files": 350,
}
#: Cases per fuzzer in the CI suite on PostgreSQL, which runs the same code over a second driver.
PG_CI_CASES: dict[str, int] = {
    "rpc_property": 70,
    "rpc_mutation": 80,
    "upload_grpc": 20,
    "upload_files": 70,
}
SOAK_DEFAULT_TOTAL = 10_000

#: Cases executed in this process, by fuzzer, and by outcome ("refused:<CODE>" or "accepted").
executed: Counter[str] = Counter()
outcomes: Counter[str] = Counter()


def cases(fuzzer: str, soak: bool, db: str = "sqlite") -> int:
    """The number of cases ``fuzzer`` should run in this mode on database ``db``."""
    if not soak:
        return (PG_CI_CASES if db == "postgresql" else CI_CASES)[fuzzer]
    total = int(os.environ.get("MOERGE_FUZZ_CASES", SOAK_DEFAULT_TOTAL))
    return max(1, round(total * CI_CASES[fuzzer] / sum(CI_CASES.values())))


def label(fuzzer: str, db: str) -> str:
    """The tally's name for ``fuzzer`` on ``db`` (SQLite keeps the plain name)."""
    return fuzzer if db == "sqlite" else f"{fuzzer}@{db}"


def record(fuzzer: str, outcome: str) -> None:
    executed[fuzzer] += 1
    outcomes[f"{fuzzer} {outcome}"] += 1


def report() -> str:
    lines = [f"fuzz cases executed: {sum(executed.values())}"]
    lines += [f"  {name}: {count}" for name, count in sorted(executed.items())]
    lines += [f"    {name}: {count}" for name, count in sorted(outcomes.items())]
    return "\n".join(lines)


def save(path: str | Path) -> None:
    Path(path).write_text(
        json.dumps({"executed": dict(executed), "outcomes": dict(outcomes)}, indent=2) + "\n"
    )
