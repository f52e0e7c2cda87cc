"""Start-up time of the ``moerge`` command (goal: under 0.5 s of import time on 2 cores).

Each round runs, in a fresh process each and in the same round-robin order:

1. ``python -c pass``: the interpreter alone (the floor, the baseline of the ratios);
2. ``python -c "import torch, flwr"``: what every command paid before the CLI imported its
   heavy modules lazily (``moerge.cli`` imported both at the top);
3. ``moerge --help``, ``moerge version`` and ``moerge admin experts list --json`` against a
   live coordinator (a ``moerge coordinator serve`` child process, tiny random BERT, SQLite,
   two experts).

Reported: the median and minimum wall time of each, its ratio to the interpreter alone, and the
cumulative ``-X importtime`` of ``moerge.cli`` (median over the rounds).

    python benchmarks/cli_startup.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the tiny model and expert builders live in tests/

RESULTS = Path(__file__).parent / "results" / "cli_startup.md"
MOERGE = str(Path(sys.executable).parent / "moerge")


def wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def import_seconds(env: dict[str, str]) -> float:
    """Cumulative import time of ``moerge.cli`` as ``-X importtime`` reports it."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import moerge.cli"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = next(x for x in done.stderr.splitlines() if re.search(r"\|\s*moerge\.cli$", x))
    return int(line.split("|")[1]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import moerge
    from tests.experts import make_expert_dir
    from tests.reliability.coordinator_process import CoordinatorProcess
    from tests.tiny_models import make_tiny_bert

    with tempfile.TemporaryDirectory(prefix="moerge-cli-startup-") as tmp:
        work = Path(tmp)
        bert = make_tiny_bert(work / "bert")
        coordinator = CoordinatorProcess(work / "data", bert).start()
        try:
            with moerge.Client(coordinator.address, token=coordinator.admin_token) as admin:
                invite = admin.create_enrollment_token().token
            env = {**os.environ, "MOERGE_HOME": str(work / "home")}
            os.environ["MOERGE_HOME"] = env["MOERGE_HOME"]
            with moerge.Client(coordinator.address) as lab:
                lab.join(invite, "lab")
                for i in range(2):
                    lab.upload(make_expert_dir(bert, work / f"e{i}", seed=i), f"e{i}")
            admin_options = ["-c", coordinator.address, "--token", coordinator.admin_token]
            variants = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "python -c 'import torch, flwr'": [sys.executable, "-c", "import torch, flwr"],
                "moerge --help": [MOERGE, "--help"],
                "moerge version": [MOERGE, "version"],
                "moerge admin experts list --json": [
                    MOERGE, "admin", "experts", "list", *admin_options, "--json"
                ],
            }  # fmt: skip
            times: dict[str, list[float]] = {name: [] for name in variants}
            imports = []
            for _ in range(args.rounds):
                for name, argv in variants.items():
                    times[name].append(wall(argv, env))
                imports.append(import_seconds(env))
        finally:
            coordinator.kill()
    text = markdown(times, imports, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def markdown(times: dict[str, list[float]], imports: list[float], args: argparse.Namespace) -> str:
    floor = statistics.median(times["python -c pass"])
    load = os.getloadavg()
    lines = [
        "# `moerge` start-up time",
        "",
        f"- command: `{' '.join(['python benchmarks/cli_startup.py', *sys.argv[1:]])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; python "
        f"{platform.python_version()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, CPU only, shared with other "
        f"jobs; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)",
        f"- {args.rounds} rounds, variants interleaved round-robin, a fresh process each; the "
        "admin list asks a live coordinator (tiny BERT, SQLite, two experts)",
        "",
        "| command | median wall | min wall | ratio to `python -c pass` |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| `{name}` | {median:.3f} s | {min(values):.3f} s | {median / floor:.2f}x |")
    lines += [
        "",
        f"Import time of `moerge.cli` (`python -X importtime`, cumulative, median): "
        f"**{statistics.median(imports):.3f} s** (goal < 0.5 s; min {min(imports):.3f} s).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
