"""Streamed detokenization: batched over requests it releases the same text as one by one."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from moerge.coordinator.inference.generation.detokenizer import StreamingDetokenizer, add_tokens
from tests.tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path_factory.mktemp("t") / "m"))


def test_detokenizers_stepped_together_release_what_each_releases_alone(tokenizer):
    rng = random.Random(0)
    texts = ["the film was great", "one two three four", "a big red car on the road"]
    sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    sequences += [[rng.randrange(tokenizer.vocab_size) for _ in range(12)] for _ in range(3)]
    stops = [(), ("x", "three"), ("red",), (), (), ()]
    alone = []
    for ids, stop in zip(sequences, stops, strict=True):
        d = StreamingDetokenizer(tokenizer, stop)
        alone.append([d.add(t) for t in ids])
    together = [StreamingDetokenizer(tokenizer, stop) for stop in stops]
    stepped: list[list[str]] = [[] for _ in sequences]
    for step in range(max(len(s) for s in sequences)):
        live = [i for i, s in enumerate(sequences) if step < len(s)]
        out = add_tokens([together[i] for i in live], [sequences[i][step] for i in live])
        for i, text in zip(live, out, strict=True):
            stepped[i].append(text)
    assert stepped == alone
    assert "".join(alone[0]) == "the film was great"
    assert together[1].stopped and "three" not in together[1].text
    assert together[2].stopped and "red" not in together[2].text
