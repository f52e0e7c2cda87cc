"""``predict_process = true`` in a real ``moerge coordinator serve``: the engine process serves
Predict, and it never outlives its coordinator, whether the coordinator stops gracefully
(SIGTERM) or is killed (SIGKILL: nothing of it runs, the engine process sees its pipe close)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from tests.processes import children
from tests.reliability.coordinator_process import CoordinatorProcess


def exited(pid: int, seconds: float) -> bool:
    """Whether ``pid`` is gone (or a zombie) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_the_engine_process_serves_predict_and_ends_with_its_coordinator(
    tmp_path: Path, tiny_bert: Path, expert_pool: list[Path], how: str
) -> None:
    coordinator = CoordinatorProcess(tmp_path / "data", tiny_bert, predict_process="true")
    with coordinator:
        target = Target(address=coordinator.address, token=coordinator.enroll("lab"))
        for i, folder in enumerate(expert_pool[:2]):
            upload_expert(target, folder, f"expert{i}", f"task{i}", progress=False)
        response = coordinator.predict()
        assert response.predictions and response.predictions[0].experts
        assert coordinator.process is not None
        logged = re.search(r"Predict's model runs in engine process (\d+)", coordinator.log_text())
        assert logged is not None
        engine = int(logged.group(1))
        # the engine process, and multiprocessing's resource tracker that spawning starts
        helpers = children(coordinator.process.pid)
        assert engine in helpers
        try:
            if how == "sigkill":
                coordinator.kill()
            else:
                coordinator.stop()
            for pid in helpers:
                assert exited(pid, 30), f"process {pid} outlived its coordinator"
        finally:  # never leave one behind, even when the test fails
            for pid in helpers:
                if not exited(pid, 0):
                    os.kill(pid, signal.SIGKILL)
