"""Routers and experts change while requests run: nothing fails, later requests see the change."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.plan import RoutingPlan
from moerge.coordinator.services.expert_store import read_lora, read_statistics
from moerge.router_training.arrow import ArrowRouter, ArrowRouterConfig
from moerge.router_training.base import ExpertRecord
from moerge.router_training.centroid import CentroidRouter, CentroidRouterConfig
from tests.inference.engine_helpers import (
    TEXTS,
    make_classification_experts,
    peft_probabilities,
)
from tests.tiny_models import make_tiny_bert


def records(folders: dict[str, Path], ids: list[str]) -> list[ExpertRecord]:
    return [
        ExpertRecord(e, e, read_statistics(folders[e]), lambda f=folders[e]: read_lora(f))
        for e in ids
    ]


def test_router_and_expert_swaps_under_concurrent_requests_fail_nothing(tmp_path: Path):
    base = make_tiny_bert(tmp_path / "bert")
    folders = make_classification_experts(base, tmp_path / "experts")
    registered = {e: folders[e] for e in ("sent-a", "sent-b")}  # grows while serving
    engine = InferenceEngine(
        base, max_rank=8, max_length=24, expert_loader=lambda expert_id: registered[expert_id]
    )
    first = CentroidRouter.fit(records(folders, ["sent-a", "sent-b"]), CentroidRouterConfig())
    second = CentroidRouter.fit(records(folders, ["topic", "sent-rev"]), CentroidRouterConfig())
    token_level = ArrowRouter.fit(records(folders, ["sent-a", "topic"]), ArrowRouterConfig(top_k=1))
    engine.set_router(first)

    errors: list[BaseException] = []
    seen: list[set[str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                for p in engine.predict(TEXTS[:3], RoutingPlan.routed(top_k=1)):
                    seen.append({w.expert_id for w in p.experts})
            except BaseException as exc:  # every failure is a test failure
                errors.append(exc)
                return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        # a new expert is registered, preloaded, and a router over it is swapped in
        registered.update(topic=folders["topic"], **{"sent-rev": folders["sent-rev"]})
        engine.add_expert("topic")
        engine.set_router(second)
        time.sleep(0.3)
        # a new version of a resident expert replaces the old one in place
        engine.add_expert("sent-a", folders["sent-b"])
        engine.set_router(token_level)
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    assert {"sent-a", "sent-b"} & set().union(*seen)
    assert {"topic", "sent-rev"} & set().union(*seen)

    # after the swaps: the active router is the token-level one, sent-a is the new version
    after = engine.predict(TEXTS[:2])
    assert all(p.aggregation == "module_mix" for p in after)
    assert {w.expert_id for p in after for w in p.experts} <= {"sent-a", "topic"}
    replaced = engine.predict(TEXTS, RoutingPlan.explicit([["sent-a"]] * len(TEXTS)))
    torch.testing.assert_close(
        torch.tensor([p.probabilities for p in replaced]),
        peft_probabilities(base, folders["sent-b"], TEXTS),
        atol=1e-5,
        rtol=0,
    )
    engine.close()


def test_a_closed_engine_refuses_new_work(tmp_path: Path):
    base = make_tiny_bert(tmp_path / "bert")
    engine = InferenceEngine(base, max_rank=4)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.embed(["the film"])
