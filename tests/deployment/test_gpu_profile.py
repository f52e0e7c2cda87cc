"""The compose file's GPU coordinator: it asks for the GPUs and for CUDA, and refuses to start
(rather than serve on the CPU) where there is none, as on this machine."""

from __future__ import annotations

import pytest

from tests.deployment.conftest import Stack
from tests.deployment.processes import run

torch = pytest.importorskip("torch")


def test_gpu_coordinator_reserves_the_gpus_builds_cuda_torch_and_asks_for_cuda(
    stack: Stack,
) -> None:
    gpu = stack.compose.service("coordinator-gpu")
    cpu = stack.compose.service("coordinator")
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    assert gpu["environment"]["MOERGE_DEVICE"] == "cuda"
    # everything else as the CPU coordinator: same database, ports, data and command
    same = {
        k: v for k, v in gpu["environment"].items() if k not in ("MOERGE_DEVICE", "MOERGE_DTYPE")
    }
    assert same == cpu["environment"]
    assert (gpu["ports"], gpu["volumes"], gpu["command"]) == (
        cpu["ports"],
        cpu["volumes"],
        cpu["command"],
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a GPU-less machine")
def test_gpu_coordinator_without_a_gpu_fails_its_check_with_a_clear_message(
    stack: Stack,
) -> None:
    env = stack.service("coordinator-gpu").environment()
    env["MOERGE_DB_URL"] = f"sqlite:///{stack.root / 'registry.db'}"
    env["MOERGE_DATA_DIR"] = str(stack.root / "data")
    result = run(["moerge", "coordinator", "serve", "--check"], env, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[FAIL] inference device" in result.stdout
    assert "no CUDA device" in result.stdout
    assert "[ok] database" in result.stdout


def test_cpu_coordinator_check_says_which_device_it_will_use(stack: Stack) -> None:
    env = stack.service("coordinator").environment()
    env["MOERGE_DB_URL"] = f"sqlite:///{stack.root / 'registry.db'}"
    env["MOERGE_DATA_DIR"] = str(stack.root / "data")
    env["MOERGE_DEVICE"] = "cpu"
    result = run(["moerge", "coordinator", "serve", "--check"], env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ok] inference device: cpu" in result.stdout
    assert "float32" in result.stdout
    assert "process of its own" not in result.stdout
    env["MOERGE_PREDICT_PROCESS"] = "true"
    result = run(["moerge", "coordinator", "serve", "--check"], env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Predict's model in a process of its own (predict_process)" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a GPU-less machine")
def test_gpu_coordinator_without_a_gpu_refuses_to_start_instead_of_serving_on_the_cpu(
    stack: Stack,
) -> None:
    env = stack.service("coordinator-gpu").environment()
    env["MOERGE_DB_URL"] = f"sqlite:///{stack.root / 'registry.db'}"
    env["MOERGE_DATA_DIR"] = str(stack.root / "data")
    env["MOERGE_LISTEN"] = "127.0.0.1:0"
    result = run(stack.service("coordinator-gpu").command(), env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: device cuda:0 was asked for but torch sees no CUDA device" in result.stderr
