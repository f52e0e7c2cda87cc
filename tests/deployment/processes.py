"""Start the coordinator as the container does (``moerge coordinator serve``), as a process."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moerge.cli.coordinator import check_health


def run(
    command: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@contextmanager
def coordinator_process(
    command: list[str], env: dict[str, str], health: list[str], log_dir: Path, timeout: float = 120
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command``; once it is SERVING, check that the ``health`` command passes; on exit
    SIGTERM it.

    Readiness is polled in-process (a ``moerge`` start-up costs seconds of imports); the
    ``health`` command itself then runs once, as the container healthcheck would.

    stdout/stderr go to files in ``log_dir`` (``coordinator.out``/``coordinator.err``) so that
    the tests can read the log lines and a chatty process never blocks on a full pipe.
    """
    address = health[health.index("--address") + 1]
    log_dir.mkdir(parents=True, exist_ok=True)
    with (
        (log_dir / "coordinator.out").open("wb") as out,
        (log_dir / "coordinator.err").open("wb") as err,
    ):
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while check_health(address, timeout=2) != "SERVING":
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"coordinator did not become healthy (exit {process.poll()}):\n"
                        + (log_dir / "coordinator.err").read_text(errors="replace")[-4000:]
                    )
                time.sleep(0.5)
            probe = run(health, env, timeout=60)
            assert probe.returncode == 0, f"healthcheck {health} failed: {probe.stdout}"
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


def json_log_lines(path: Path) -> list[dict[str, object]]:
    """Every non-empty line of ``path`` parsed as JSON (raises on the first line that is not)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line) for line in lines]
