"""PHATGOOSE gates: one learned vector per LoRA module saying which tokens the expert suits.

PHATGOOSE (Muqeeth et al., 2024, "Learning to Route Among Specialized Experts for Zero-Shot
Generalization") trains, after the expert itself, a gate vector ``v_m`` [d_in] in front of every
LoRA module ``m`` while everything else stays frozen, so that the module computes per token::

    W x + sigmoid(v_m . x) * (B A x) * scaling

The gates start at zero (sigmoid = 0.5 everywhere) and are trained for a few steps with the
expert's own task loss (the reference code: 100 steps, AdamW, lr 5e-3). At the coordinator, a
token is routed, per module, to the experts whose gate vectors align best with it.

moerge's default learning rate is 10x the reference's, 5e-2. A contributor's expert here is
trained on a few hundred examples with the linear-probe head (LP-FT), and on its own training
data the loss barely depends on how far the LoRA is open (Rotten Tomatoes: 0.25 at half the
LoRA, 0.32 at all of it), so at 5e-3 the gates hardly leave their start (mean sigmoid
0.50-0.61 on any text) and their direction is the noise of the first steps: PHATGOOSE routed
34-43% of the public suite's stream over three gate seeds, 23-31% of the oracle's task
accuracy. At 5e-2 the same experts gave 42-64% routing, 41-63% of the oracle, better on every
seed (gates trained on 128 tokens, the CLI's default). End to end at 64 tokens (the demo's and
benchmarks/routing_quality.py's) it moved PHATGOOSE by about a point either way: 54.7% of the
oracle against 53.8% on the public suite, 54.3% against 55.2% in the demo
(benchmarks/results/data_free_routing.md, 2026-12-07). So it is not a fix: routing by the same
scoring over each task's mean token states (a statistic of the data) reaches 88% of the
oracle; the limit is what the gates learn, not the scoring.

The gate is added with forward hooks on PEFT's LoRA layers (PEFT itself is not changed): a
pre-hook on the LoRA layer reads its input ``x`` and computes ``sigmoid(v_m . x)``, and a hook on
``lora_B[adapter]`` scales that module's output, which is exactly the LoRA path's term.
Gate training runs the model in eval mode (no dropout), matching how the expert is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedTokenizerBase

from moerge.contributor_client.batching import collate, encode, length_grouped_batches
from moerge.contributor_client.training_loop import training_progress

#: PEFT's prefix in front of every module path of a ``PeftModel``.
PEFT_PREFIX = "base_model.model."


@dataclass
class GateConfig:
    """How to train PHATGOOSE gates (the reference code's defaults but the learning rate)."""

    steps: int = 100  # optimizer steps over the local data
    learning_rate: float = 5e-2  # AdamW learning rate (10x the reference's; see above)
    init: float = 0.0  # initial value of every gate entry (0: sigmoid gives 0.5 per token)
    batch_size: int = 16  # examples per step
    max_length: int = 128  # tokens kept per example
    seed: int = 0  # seeds the batch order (batches group similar lengths, as in training)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("steps", "learning_rate", "batch_size", "max_length"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


def base_module_path(peft_name: str, model: PeftModel) -> str:
    """Path of a PEFT module in the *base* model, e.g. ``encoder.layer.0.attention.self.query``.

    Strips PEFT's ``base_model.model.`` and the task model's own prefix (``bert.`` in
    ``BertForSequenceClassification``, ``model.`` in ``LlamaForCausalLM``), so that gates are
    keyed the same for every task head (see :func:`moerge.expert_format.gate_key`).
    """
    name = peft_name.removeprefix(PEFT_PREFIX)
    task_prefix = getattr(model.get_base_model(), "base_model_prefix", "")
    if task_prefix and name.startswith(task_prefix + "."):
        name = name[len(task_prefix) + 1 :]
    return name


def lora_layers(model: PeftModel, adapter: str = "default") -> dict[str, LoraLayer]:
    """The linear LoRA layers of ``adapter``, keyed by their path in the base model, in order.

    Only layers over ``nn.Linear`` get gates: a gate scores the layer's input activation.
    """
    return {
        base_module_path(name, model): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
        and adapter in module.lora_A
        and isinstance(module.get_base_layer(), nn.Linear)
    }


def gate_width(layer: LoraLayer) -> int:
    """The width of the activation a gate scores: the input of the layer's base ``nn.Linear``."""
    base = layer.get_base_layer()
    assert isinstance(base, nn.Linear)  # lora_layers keeps only layers over nn.Linear
    return base.in_features


class LoraGates:
    """Adds a PHATGOOSE gate to every LoRA layer of a model while used as a context manager.

    ``gates`` maps each module's base-model path to its gate vector [d_in] (a leaf tensor that
    requires grad). Leaving the context removes the hooks; the model is then as before.
    """

    def __init__(self, model: PeftModel, init: float = 0.0, adapter: str = "default") -> None:
        self.layers = lora_layers(model, adapter)
        if not self.layers:
            raise ValueError(f"the model has no LoRA layers of adapter '{adapter}'")
        self.adapter = adapter
        self.gates: dict[str, torch.Tensor] = {
            name: nn.Parameter(torch.full((gate_width(layer),), float(init)))
            for name, layer in self.layers.items()
        }
        # Optional modules computing a gate's score (DP-SGD: Opacus must see the gate's calls).
        self.score_modules: dict[str, nn.Module] = {}
        self._scores: dict[str, torch.Tensor] = {}  # name -> sigmoid(v . x) [..., 1]
        self._handles: list[RemovableHandle] = []

    def parameters(self) -> Iterator[torch.Tensor]:
        """The gate vectors, for an optimiser (only they are trained)."""
        return iter(self.gates.values())

    def __enter__(self) -> LoraGates:
        for name, layer in self.layers.items():
            assert isinstance(layer, nn.Module)  # LoraLayer is a mixin of PEFT's LoRA modules
            score = self._score_hook(name)
            self._handles.append(layer.register_forward_pre_hook(score, with_kwargs=True))
            lora_b = layer.lora_B[self.adapter]
            self._handles.append(lora_b.register_forward_hook(self._scale_hook(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._scores.clear()

    def _score_hook(self, name: str) -> Callable[..., None]:
        gate = self.gates[name]

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["x"]  # [..., d_in], the LoRA layer's input
            scorer = self.score_modules.get(name)
            if scorer is not None:
                self._scores[name] = scorer(x)
                return
            self._scores[name] = torch.sigmoid(x @ gate.to(x.dtype)).unsqueeze(-1)  # [..., 1]

        return hook

    def _scale_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(
            module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor:
            return output * self._scores.pop(name)  # [..., d_out] * [..., 1]

        return hook


def train_gates(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    label_ids: Sequence[int] | None,
    config: GateConfig,
    causal_lm: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Train one gate per LoRA module with the task loss; everything else stays frozen.

    ``label_ids`` index the head's outputs (classification); causal LM uses the LM loss on
    ``texts``. Returns ``{base-model module path: gate [d_in]}``. The model's parameters and
    mode are restored afterwards; the caller's global RNG state is untouched.
    """
    config.validate()
    if not causal_lm and (label_ids is None or len(label_ids) != len(texts)):
        raise ValueError("classification gates need one label id per text")
    token_ids = encode(tokenizer, texts, config.max_length)
    generator = torch.Generator().manual_seed(config.seed)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False)
    model.eval()
    try:
        with LoraGates(model, config.init) as gates, training_progress(progress) as bar:
            optimizer = torch.optim.AdamW(gates.parameters(), lr=config.learning_rate)
            task = bar.add_task("gates", total=config.steps, loss=float("nan"))
            lengths = [len(ids) for ids in token_ids]
            for rows in _cycled_batches(lengths, config.batch_size, config.steps, generator):
                batch = collate(
                    [token_ids[i] for i in rows],
                    tokenizer,
                    None if label_ids is None else [label_ids[i] for i in rows],
                    causal_lm=causal_lm,
                )
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(task, advance=1, loss=loss.item())
            return {name: gate.detach().clone() for name, gate in gates.gates.items()}
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)


def _cycled_batches(
    lengths: Sequence[int], batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """``steps`` length-grouped batches, passing over the data as often as needed."""
    batches: list[list[int]] = []
    for _ in range(steps):
        if not batches:
            batches = length_grouped_batches(lengths, batch_size, generator)
        yield batches.pop(0)
