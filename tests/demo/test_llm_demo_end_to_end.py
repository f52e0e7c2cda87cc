"""``moerge demo --llm`` end to end on a tiny Llama: processes, uploads, routers, generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from moerge.llm_demo import LLM_ROUTERS, run_llm_demo
from tests.tiny_models import make_tiny_llama

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.mark.slow
def test_tiny_llm_demo_scores_every_method_through_predict(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    data_dir = tmp_path / "demo"
    scores = run_llm_demo(
        data_dir, ["word_class", "review_verdict"], train_per_task=8, test_per_task=4,
        epochs=1, parallel=2, seed=0, max_new_tokens=2, model_dir=model,
    )  # fmt: skip
    assert [s.method for s in scores] == ["oracle", *LLM_ROUTERS]
    assert not [s.error for s in scores if s.error]
    oracle = scores[0]
    assert oracle.routing_accuracy == 1.0
    assert set(oracle.exact_by_task) == {"word_class", "review_verdict"}
    saved = json.loads((data_dir / "llm_results.json").read_text())
    assert [m["method"] for m in saved["methods"]] == [s.method for s in scores]
    # each contributor saw only its own (prompt, answer) pairs
    pairs = (data_dir / "contributors" / "word_class" / "data.jsonl").read_text().splitlines()
    assert len(pairs) == 8
    answers = {json.loads(line)["label"] for line in pairs}
    assert answers <= {"noun", "verb", "adjective", "adverb"}
