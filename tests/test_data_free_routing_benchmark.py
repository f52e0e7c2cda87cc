"""The data-free-routing benchmark's token-centroid bound, on a tiny BERT (no expert is trained).

The bound replaces each expert's PHATGOOSE gates by the mean standardised input of each module
over the task's texts; these tests pin what that mean is and that nothing else of the expert
changes, so the bound row measures PHATGOOSE's scoring and nothing more.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from moerge.router_training.base import ExpertRecord, ExpertStatistics
from moerge.router_training.phatgoose import standardise
from tests.benchmark_scripts import load_benchmark
from tests.tiny_models import make_tiny_bert

QUERY0 = "encoder.layer.0.attention.self.query"
VALUE1 = "encoder.layer.1.attention.self.value"
TEXTS = ["the cat sat", "a dog ran far away", "the"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("data_free_routing")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("base"))


def test_token_centroid_is_the_mean_standardised_module_input_over_real_tokens(
    bench: ModuleType, base: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModel.from_pretrained(base).eval()
    centroids = bench.token_centroids(model, tokenizer, [QUERY0, VALUE1], TEXTS)

    per_text = []
    with torch.no_grad():
        for text in TEXTS:  # one at a time: no padding can leak into the mean
            states = model(**tokenizer([text], return_tensors="pt"), output_hidden_states=True)
            per_text.append(states.hidden_states)
    # layer 0's query reads the embeddings' output; layer 1's value reads layer 0's output
    for module, index in ((QUERY0, 0), (VALUE1, 1)):
        tokens = torch.cat([standardise(h[index][0], eps=1e-5) for h in per_text])
        torch.testing.assert_close(centroids[module], tokens.mean(dim=0), rtol=1e-4, atol=1e-5)


def test_bound_replaces_only_the_gates(bench: ModuleType, base: Path) -> None:
    stats = ExpertStatistics(
        example_count=3,
        mean=torch.zeros(32),
        cov_diag=torch.ones(32),
        cov_factor=torch.zeros(32, 2),
        gates={QUERY0: torch.ones(32)},
        label_names=["x", "y"],
    )
    record = ExpertRecord("e1", "task", stats)

    (bound,) = bench.with_token_centroid_gates([record], base, {"task": TEXTS})

    assert bound.expert_id == "e1" and bound.task_name == "task"
    assert bound.statistics is not None and set(bound.statistics.gates) == {QUERY0}
    assert not torch.equal(bound.statistics.gates[QUERY0], torch.ones(32))
    assert bound.statistics.label_names == ["x", "y"] and bound.statistics.example_count == 3
    assert record.statistics is stats and torch.equal(stats.gates[QUERY0], torch.ones(32))


def test_unknown_module_is_refused_by_name(bench: ModuleType, base: Path) -> None:
    with pytest.raises(ValueError, match=r"encoder\.layer\.9"):
        bench.token_centroids(
            AutoModel.from_pretrained(base),
            AutoTokenizer.from_pretrained(base),
            ["encoder.layer.9.attention.self.query"],
            TEXTS,
        )
