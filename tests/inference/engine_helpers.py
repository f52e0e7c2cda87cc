"""Experts on tiny models and their reference outputs computed with plain PEFT, for engine tests."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.generation.requests import (
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    GenerationRequest,
    TextDelta,
)
from moerge.coordinator.inference.generation.sampling import SamplingParams
from moerge.coordinator.inference.plan import RoutingPlan
from moerge.expert_format import ADAPTER_WEIGHTS
from tests.experts import make_expert_dir

SENTIMENT = ("neg", "pos")
TOPIC = ("sport", "money", "tech")

TEXTS = [
    "the film was great and the actor was good",
    "awful boring plot",
    "the team will win the cup this season",
    "stock market growth and profit for the bank",
    "new phone software and online data",
    "the minister lost the vote",
]


def sharpen_head(folder: Path, seed: int) -> None:
    """Replace the (near-zero) initial classifier by a large random one so experts disagree."""
    path = folder / ADAPTER_WEIGHTS
    state = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for key in [k for k in state if k.endswith("classifier.weight")]:
        state[key] = torch.randn(state[key].shape, generator=generator)
    for key in [k for k in state if k.endswith("classifier.bias")]:
        state[key] = 0.1 * torch.randn(state[key].shape, generator=generator)
    save_file(state, str(path), metadata={"format": "pt"})


def assert_same_predictions(together: list, alone: list, atol: float = 1e-5) -> None:
    """Per request, one-input predictions agree: experts, label and probabilities (``atol``)."""
    for mine, reference in zip(together, alone, strict=True):
        assert not isinstance(mine, BaseException)
        assert [w.expert_id for w in mine[0].experts] == [w.expert_id for w in reference[0].experts]
        assert mine[0].output == reference[0].output
        torch.testing.assert_close(
            torch.tensor(mine[0].probabilities),
            torch.tensor(reference[0].probabilities),
            atol=atol,
            rtol=0,
        )


def make_classification_experts(base: Path, root: Path) -> dict[str, Path]:
    """Two sentiment experts (ranks 4, 2), one with the labels reordered, one topic expert."""
    specs = {
        "sent-a": (SENTIMENT, 4, 1),
        "sent-b": (SENTIMENT, 2, 2),
        "sent-rev": (SENTIMENT[::-1], 4, 3),
        "topic": (TOPIC, 4, 4),
    }
    folders = {}
    for expert_id, (labels, rank, seed) in specs.items():
        folder = make_expert_dir(
            base, root / expert_id, labels=labels, rank=rank, seed=seed, task_name=expert_id
        )
        sharpen_head(folder, seed)
        folders[expert_id] = folder
    return folders


def make_causal_experts(base: Path, root: Path, count: int = 2) -> dict[str, Path]:
    return {
        f"lm-{i}": make_expert_dir(
            base, root / f"lm-{i}", rank=4, seed=10 + i, task_type="causal_lm", task_name=f"lm-{i}"
        )
        for i in range(count)
    }


@torch.no_grad()
def peft_probabilities(base: Path, folder: Path, texts: list[str]) -> torch.Tensor:
    """The expert's own class distribution by plain PEFT: [B, L] in its head's label order."""
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    labels = next(v.shape[0] for k, v in state.items() if k.endswith("classifier.bias"))
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=labels)
    peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return torch.softmax(peft_model(**enc).logits, dim=-1)


@torch.no_grad()
def peft_generate(
    base: Path,
    adapters: dict[str, Path],
    texts: list[str],
    max_new_tokens: int,
    combine: tuple[str, list[float], dict[str, object]] | None = None,
) -> list[str]:
    """PEFT greedy generation (left-padded batch) with one adapter or a weighted combination.

    ``combine`` = (combination_type, weights, extra kwargs of ``add_weighted_adapter``).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(base))
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    if combine is not None:
        kind, weights, extra = combine
        peft_model.add_weighted_adapter(names, weights, "combined", combination_type=kind, **extra)
        peft_model.set_adapter("combined")
    else:
        peft_model.set_adapter(names[0])
    peft_model.eval()
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    out = peft_model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    new = out[:, enc["input_ids"].shape[1] :]
    texts_out = []
    for row in new.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        texts_out.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts_out


# -- streamed generation ----------------------------------------------------------------------
def text_of(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


class Held:
    """Blocks the engine's worker so that several submissions meet in one scheduler step."""

    def __init__(self, engine: InferenceEngine) -> None:
        self.release = threading.Event()
        self.engine = engine

    def __enter__(self) -> Held:
        self.engine.executor.submit(self.release.wait)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()


def submit_all(
    engine: InferenceEngine, specs: list[tuple[str, RoutingPlan | None, SamplingParams]]
):
    """Submit every spec while the worker is held; return each request's events when done."""
    results: list[list[GenerationEvent]] = [[] for _ in specs]
    done = [threading.Event() for _ in specs]

    def sink_for(i: int):
        def sink(event: GenerationEvent) -> None:
            results[i].append(event)
            if isinstance(event, (GenerationFinished, GenerationFailed)):
                done[i].set()

        return sink

    requests = []
    with Held(engine):
        for i, (prompt, plan, sampling) in enumerate(specs):
            request = GenerationRequest(
                prompt=prompt, routing_text=prompt, sampling=sampling, sink=sink_for(i), plan=plan
            )
            engine.scheduler.submit(request)
            requests.append(request)
    for event in done:
        assert event.wait(60)
    return results, requests
