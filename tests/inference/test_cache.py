"""The expert cache keeps within its byte budget, evicts least recently used, reloads silently."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moerge.coordinator.inference.cache import SPARE_SLOTS
from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.errors import IncompatibleExpert, UnknownExpert
from moerge.coordinator.inference.lora_bank import LoraBank
from moerge.coordinator.inference.plan import RoutingPlan
from moerge.expert_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.experts import make_expert_dir
from tests.inference.engine_helpers import TEXTS, make_classification_experts
from tests.tiny_models import make_tiny_bert


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("cache")
    base = make_tiny_bert(root / "bert")
    return base, make_classification_experts(base, root / "experts")


@pytest.fixture
def engine(setup) -> Iterator[InferenceEngine]:
    base, folders = setup
    engine = InferenceEngine(
        base, max_rank=8, max_length=24, cache_bytes=1 << 30, expert_loader=folders.__getitem__
    )
    yield engine
    engine.close()


def expert_bytes(engine: InferenceEngine, expert_id: str) -> int:
    engine.predict(TEXTS[:1], RoutingPlan.explicit([[expert_id]]))
    size = engine.cache.stats()["resident_bytes"]
    engine.remove_expert(expert_id)
    return size


def use(engine: InferenceEngine, expert_id: str) -> list[tuple[float, ...]]:
    predictions = engine.predict(TEXTS, RoutingPlan.explicit([[expert_id]] * len(TEXTS)))
    assert engine.cache.resident_bytes <= engine.cache.budget_bytes
    return [p.probabilities for p in predictions]


def test_cache_evicts_least_recently_used_experts_to_stay_within_its_budget(engine):
    size = expert_bytes(engine, "sent-a")  # sent-a, sent-b, sent-rev: same size (2 labels)
    engine.cache.set_budget(int(2.5 * size))
    use(engine, "sent-a")
    use(engine, "sent-b")
    use(engine, "sent-a")  # sent-b is now the least recently used
    use(engine, "sent-rev")
    assert engine.cache.resident_ids == ["sent-a", "sent-rev"]
    assert engine.cache.stats()["evictions"] == 1


def test_evicted_expert_is_reloaded_transparently_with_identical_outputs(engine):
    size = expert_bytes(engine, "sent-a")
    engine.cache.set_budget(size)  # room for one expert
    before = use(engine, "sent-b")
    use(engine, "sent-a")
    assert "sent-b" not in engine.cache
    loads = engine.cache.loads
    assert use(engine, "sent-b") == before
    assert engine.cache.loads == loads + 1


def test_a_batch_needing_more_than_the_budget_runs_then_the_cache_trims_back(engine, setup):
    size = expert_bytes(engine, "sent-a")
    engine.cache.set_budget(size)
    plan = RoutingPlan.explicit([["sent-a", "sent-b"], ["sent-rev", "topic"]])
    predictions = engine.predict(TEXTS[:2], plan)
    assert [len(p.expert_outputs) for p in predictions] == [2, 2]
    assert engine.cache.resident_bytes <= size
    assert len(engine.cache.resident_ids) <= 1


def test_a_zero_budget_still_serves_every_request(engine):
    engine.cache.set_budget(0)
    assert use(engine, "topic") == use(engine, "topic")
    assert engine.cache.resident_ids == []


def test_unknown_expert_raises_and_leaves_the_cache_unchanged(engine):
    use(engine, "sent-a")
    with pytest.raises(UnknownExpert, match="ghost"):
        engine.predict(TEXTS[:2], RoutingPlan.explicit([["sent-b"], ["ghost"]]))
    assert engine.cache.resident_ids == ["sent-a", "sent-b"]
    assert engine.cache.resident_bytes == sum(
        e.nbytes
        for e in engine.cache._resident.values()  # the accounting stays exact
    )


def test_an_expert_that_does_not_fit_the_base_model_is_refused(engine, setup, tmp_path):
    _, folders = setup
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "statistics.json", "statistics.safetensors"):
        (broken / name).write_bytes((folders["sent-a"] / name).read_bytes())
    config = json.loads((broken / ADAPTER_CONFIG).read_text())
    (broken / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(IncompatibleExpert, match="use_dora"):
        engine.add_expert("broken", broken)
    assert "broken" not in engine.cache


def test_a_replacement_that_does_not_fit_leaves_the_old_version_serving(engine, setup, tmp_path):
    base, _ = setup
    too_big = make_expert_dir(base, tmp_path / "rank16", rank=16, seed=9)  # bank max_rank is 8
    old = use(engine, "sent-a")
    with pytest.raises(IncompatibleExpert, match="max_rank"):
        engine.add_expert("sent-a", too_big)
    assert use(engine, "sent-a") == old
    assert engine.cache.loads == 1


def test_replacing_a_resident_expert_swaps_its_weights_in_place(engine, setup):
    _, folders = setup
    old = use(engine, "sent-a")
    engine.add_expert("sent-a", folders["sent-b"])
    assert use(engine, "sent-a") == use(engine, "sent-b") != old
    assert engine.remove_expert("sent-a") is True
    assert use(engine, "sent-a") == old  # reloaded through the loader: the original again


def test_merging_reads_each_experts_own_factors_back_from_the_bank(engine, setup):
    _, folders = setup
    use(engine, "sent-b")  # rank 2 in a bank of max_rank 8
    loaded = engine.cache._resident["sent-b"]
    state = load_file(str(folders["sent-b"] / ADAPTER_WEIGHTS))
    config = json.loads((folders["sent-b"] / ADAPTER_CONFIG).read_text())
    expected = LoraBank.lora_weights_from_peft(state, config)
    got = loaded.factors(engine.bank)
    assert len(got) == len(expected) == 4
    for name, (a, b, scaling) in expected.items():
        (match,) = [m for m in got if name.endswith("." + m)]
        torch.testing.assert_close(got[match][0], a)
        torch.testing.assert_close(got[match][1], b)
        assert got[match][2] == pytest.approx(scaling)


def test_reserving_for_a_router_grows_the_bank_once_to_its_experts_and_spare_slots(engine):
    engine.cache.reserve_for(40)
    assert engine.bank.capacity == 40 + SPARE_SLOTS
    engine.cache.reserve_for(12)  # already room: no reallocation
    assert engine.bank.capacity == 40 + SPARE_SLOTS


def test_reserving_never_holds_more_slots_than_the_budget_pays_for(engine):
    slot = sum(m.nbytes_per_slot() for m in engine.bank.modules.values())
    engine.cache.set_budget(20 * slot)
    engine.cache.reserve_for(1000)
    assert engine.bank.capacity == 20 + SPARE_SLOTS


def test_a_larger_budget_lets_the_next_reservation_grow_the_bank_again(engine):
    slot = sum(m.nbytes_per_slot() for m in engine.bank.modules.values())
    engine.cache.set_budget(20 * slot)
    engine.cache.reserve_for(60)
    assert engine.bank.capacity == 20 + SPARE_SLOTS
    engine.cache.set_budget(60 * slot)
    engine.cache.reserve_for(60)
    assert engine.bank.capacity == 60 + SPARE_SLOTS
