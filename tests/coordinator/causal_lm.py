"""A causal-LM coordinator with uploaded experts, for tests of Generate and its request path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir

#: coordinator settings for the tiny Llama (session fixture ``tiny_llama``) as a causal LM
TINY_LLAMA_SETTINGS: dict[str, object] = {
    "base_model_id": "tiny-llama",
    "task_type": "causal_lm",
    "target_modules": ("q_proj", "v_proj"),
    "max_input_tokens": 32,
    "max_new_tokens": 8,
}


@contextmanager
def causal_lm_coordinator(root: Path, tiny_llama: Path) -> Iterator[BackgroundCoordinator]:
    """A coordinator (SQLite, the tiny Llama on ``device = auto``) with two experts, ``lm0``
    and ``lm1``, uploaded by one enrolled contributor; no router trained yet."""
    config = coordinator_config(
        root / "data", tiny_llama, **TINY_LLAMA_SETTINGS, device="auto", dtype="auto"
    )
    with BackgroundCoordinator(config) as running:
        _, credential = enroll(running.address, running.admin_token(), "lab")
        target = Target(address=running.address, token=credential)
        for i in range(2):
            folder = make_expert_dir(
                tiny_llama,
                root / f"lm{i}",
                rank=4,
                seed=10 + i,
                task_type="causal_lm",
                task_name=f"task{i}",
            )
            upload_expert(target, folder, f"lm{i}", f"task{i}", progress=False)
        yield running
