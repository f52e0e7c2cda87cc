"""DP-SGD for the adapter and the PHATGOOSE gates, with Opacus.

``moerge train --dp-sgd-epsilon E`` trains the LoRA adapter and its head, then the gates, with
differentially private SGD (Abadi et al. 2016): every step takes a Poisson sample of the
training examples (each with probability ``q = batch_size / n``), computes each example's
gradient (Opacus' ``GradSampleModule``), clips it to ``max_grad_norm`` and adds Gaussian noise of
std ``noise_multiplier * max_grad_norm`` to their sum (Opacus' ``DPOptimizer``). The two runs
share one noise multiplier, the smallest for which they compose to (E, delta)-DP under
``dp_accounting``'s PLD accountant, the accountant of the statistics' release
(:mod:`privacy`), so that :func:`privacy.privacy_report` composes all three into one guarantee.

By default the run trains the classification head alone and leaves the LoRA update at zero
(``train_lora=False``): the noise grows with the number of parameters trained (~75k LoRA
entries beside the head's few thousand), and with a few hundred examples the head is what
DP-SGD can afford (BBC news, 600 examples, epsilon 8: head 77.0%, head + LoRA 22.0%, no DP
89.5%; benchmarks/results/dp_sgd.md).
``train_lora=True`` trains both, for contributors with many more examples.

What DP-SGD changes beside the optimizer, because each would otherwise release something
about the data without noise: the head starts at random (no linear probe fitted on the data),
the loss is unweighted (class weights count labels), no checkpoint is chosen on validation
data (no early stopping); the validation split is still held out and its accuracy reported
locally, but not written to ``statistics.json``. Classification experts only (a causal-LM
expert's per-token loss needs its own per-example treatment; not done yet).

Gates: PHATGOOSE's gate vectors live in forward hooks, not modules; here each gate is a small
module (:class:`GateModule`) called from the hook, so Opacus computes per-example gradients for
it with its generic ``functorch`` mode.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moerge.contributor_client.gates import GateConfig
    from moerge.contributor_client.privacy import SGDAccount


@dataclass
class DPSGDConfig:
    """A DP-SGD budget for the adapter and the gates together, and how to spend it."""

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-example gradient clipping norm
    batch_size: int = 64  # expected examples per step (Poisson sampling)
    # AdamW on the noisy mean gradient, warm-up + linear decay. High because the noise, not the
    # step size, limits what a step learns: BBC news, 600 examples, epsilon 8, head only:
    # 2e-3 -> 38% test accuracy, 1e-2 -> 49%, 5e-2 -> 77% (non-private 89.5%).
    learning_rate: float = 5e-2
    min_steps: int = 150  # at least this many adapter steps (more epochs if the data is small)
    gate_batch_size: int = 64
    # The gates' run, counted in the calibration when they are trained too (set by build).
    gate_steps: int = 0
    gate_examples: int = 0
    noise_multiplier: float | None = None  # set by calibrate(); None until then
    # Also train the LoRA factors (else the head alone, the LoRA update staying zero): with a
    # few hundred examples the noise on ~75k LoRA entries swamps them (benchmarks/dp_sgd.py).
    train_lora: bool = False

    def runs(self, train_count: int, epochs: int) -> list[tuple[float, int]]:
        """(sampling rate, steps) of the adapter run and, if any, the gates' run."""
        runs = [adapter_steps(self, train_count, epochs)]
        if self.gate_steps:
            runs.append(
                (min(1.0, self.gate_batch_size / max(self.gate_examples, 1)), self.gate_steps)
            )
        return runs

    def validate(self) -> None:
        """Refuse a non-positive epsilon, a delta outside (0, 1) and non-positive training
        settings."""
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"DP-SGD epsilon must be a positive number, got {self.epsilon!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"DP-SGD delta must be in (0, 1), got {self.delta!r}")
        for name in ("max_grad_norm", "batch_size", "learning_rate", "gate_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DP-SGD {name} must be positive")


def adapter_steps(config: DPSGDConfig, train_count: int, epochs: int) -> tuple[float, int]:
    """Sampling rate and steps of the adapter run over ``train_count`` examples."""
    q = min(1.0, config.batch_size / max(train_count, 1))
    return q, max(config.min_steps, math.ceil(epochs / q))


def calibrate(config: DPSGDConfig, runs: Sequence[tuple[float, int]]) -> float:
    """The smallest noise multiplier for which ``runs`` ((q, steps) each) compose to the
    budget of ``config`` (PLD accountant); stored in ``config.noise_multiplier``."""
    import dp_accounting
    from dp_accounting import mechanism_calibration
    from dp_accounting.pld import PLDAccountant

    from moerge.contributor_client.privacy import dp_sgd_event

    config.validate()

    def composed(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent([dp_sgd_event(sigma, q, t) for q, t in runs])

    sigma = mechanism_calibration.calibrate_dp_mechanism(
        lambda: PLDAccountant(value_discretization_interval=1e-3),
        composed,
        config.epsilon,
        config.delta,
        mechanism_calibration.LowerEndpointAndGuess(0.3, 1.0),
        tol=1e-3,
    )
    config.noise_multiplier = float(sigma)
    return config.noise_multiplier


def account(config: DPSGDConfig, q: float, steps: int, parameters: str = "") -> SGDAccount:
    """The :class:`SGDAccount` of one run at the calibrated noise multiplier."""
    from moerge.contributor_client.privacy import SGDAccount, composed_epsilon, dp_sgd_event

    assert config.noise_multiplier is not None
    epsilon = composed_epsilon([dp_sgd_event(config.noise_multiplier, q, steps)], config.delta)
    return SGDAccount(
        noise_multiplier=config.noise_multiplier,
        sample_rate=q,
        steps=steps,
        max_grad_norm=config.max_grad_norm,
        epsilon=epsilon,
        delta=config.delta,
        parameters=parameters,
    )


#: Opacus' hooks on a frozen base model: the inputs of the first trainable layer need no
#: gradient, which torch reports on every backward pass although nothing is wrong.
_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module"


def poisson_rows(count: int, q: float, generator: torch.Generator) -> list[int]:
    """Each of ``range(count)`` independently with probability ``q`` (Opacus' DPDataLoader)."""
    return torch.nonzero(torch.rand(count, generator=generator) < q).flatten().tolist()


def private_optimizer(
    parameters: list[torch.nn.Parameter], config: DPSGDConfig, learning_rate: float
) -> Any:
    """AdamW wrapped in Opacus' ``DPOptimizer`` (clip each example, sum, add noise, average)."""
    from opacus.optimizers import DPOptimizer

    assert config.noise_multiplier is not None
    return DPOptimizer(
        torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0),
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=config.batch_size,
        loss_reduction="mean",
    )


def noisy_empty_step(optimizer: Any, parameters: list[torch.nn.Parameter]) -> None:
    """A step on an empty Poisson sample: the noise alone (skipping it would tell that the
    sample was empty, which depends on the data set's size)."""
    for p in parameters:
        # Opacus keeps per-sample gradients in an attribute it adds to parameters at run time.
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_adapter_dp(
    model: Any,
    tokenizer: Any,
    token_ids: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    train_idx: Sequence[int],
    config: DPSGDConfig,
    epochs: int,
    seed: int,
    warmup_fraction: float,
    progress: bool,
) -> tuple[list[float], SGDAccount]:
    """Train the trainable parameters of PEFT ``model`` (LoRA + head) with DP-SGD; the noise
    multiplier must be calibrated. Returns the loss of every step and the run's account."""
    from opacus import GradSampleModule

    from moerge.contributor_client.batching import collate
    from moerge.contributor_client.training_loop import lr_factor, training_progress

    q, steps = adapter_steps(config, len(train_idx), epochs)
    generator = torch.Generator().manual_seed(seed)
    if not config.train_lora:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(False)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = private_optimizer(trainable, config, config.learning_rate)
    warmup = max(1, round(warmup_fraction * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer.original_optimizer, lambda step: lr_factor(step, warmup, steps, "linear")
    )
    curve: list[float] = []
    wrapped.train()
    warnings.filterwarnings("ignore", message=_HOOK_WARNING)
    try:
        with training_progress(progress) as bar:
            task = bar.add_task("training (DP-SGD)", total=steps, loss=float("nan"))
            for _ in range(steps):
                rows = poisson_rows(len(train_idx), q, generator)
                if not rows:
                    noisy_empty_step(optimizer, trainable)
                else:
                    chosen = [train_idx[r] for r in rows]
                    batch = collate(
                        [token_ids[i] for i in chosen], tokenizer, [label_ids[i] for i in chosen]
                    )
                    labels = batch.pop("labels")
                    logits = wrapped(**batch).logits.float()
                    loss = torch.nn.functional.cross_entropy(logits, labels)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    curve.append(loss.item())
                schedule.step()
                window = curve[-20:] or [float("nan")]
                bar.update(task, advance=1, loss=sum(window) / len(window))
    finally:
        wrapped._close()  # removes Opacus' hooks; the PEFT model is as before
    return curve, account(config, q, steps, "head+lora" if config.train_lora else "head")


class GateModule(torch.nn.Module):
    """One PHATGOOSE gate as a module, so Opacus sees its calls: ``sigmoid(x . v)`` [..., 1]."""

    def __init__(self, size: int, init: float) -> None:
        super().__init__()
        self.vector = torch.nn.Parameter(torch.full((size,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's score ``sigmoid(x . v)`` for each activation row [..., 1]; a module so that
        Opacus sees the gate's calls."""
        return torch.sigmoid(x @ self.vector.to(x.dtype)).unsqueeze(-1)


def train_gates_dp(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    label_ids: Sequence[int] | None,
    gate_config: GateConfig,
    config: DPSGDConfig,
    *,
    causal_lm: bool = False,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], SGDAccount]:
    """PHATGOOSE gates trained with DP-SGD at the calibrated noise multiplier (calibrated here
    for the gates alone if the adapter was not trained with DP-SGD in this process)."""
    from opacus import GradSampleModule

    from moerge.contributor_client.batching import collate, encode
    from moerge.contributor_client.gates import LoraGates, gate_width
    from moerge.contributor_client.training_loop import training_progress

    if causal_lm or label_ids is None:
        raise ValueError("DP-SGD gates need a classification expert with labels")
    gate_config.validate()
    q = min(1.0, config.gate_batch_size / max(len(texts), 1))
    if config.noise_multiplier is None:
        calibrate(config, [(q, gate_config.steps)])
    token_ids = encode(tokenizer, texts, gate_config.max_length)
    generator = torch.Generator().manual_seed(gate_config.seed)
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    model.eval()
    gates = LoraGates(model, gate_config.init)
    gate_modules = [
        GateModule(gate_width(layer), gate_config.init) for layer in gates.layers.values()
    ]
    modules = torch.nn.ModuleDict({str(i): module for i, module in enumerate(gate_modules)})
    for name, module in zip(gates.layers, gate_modules, strict=True):
        gates.gates[name] = module.vector
        gates.score_modules[name] = module
    wrapped = GradSampleModule(modules, batch_first=True, loss_reduction="mean")
    parameters = list(modules.parameters())
    private = DPSGDConfig(**{**config.__dict__, "batch_size": config.gate_batch_size})
    optimizer = private_optimizer(parameters, private, gate_config.learning_rate)
    warnings.filterwarnings("ignore", message=_HOOK_WARNING)
    try:
        with gates, training_progress(progress) as bar:
            task = bar.add_task("gates (DP-SGD)", total=gate_config.steps, loss=float("nan"))
            for _ in range(gate_config.steps):
                rows = poisson_rows(len(texts), q, generator)
                if not rows:
                    noisy_empty_step(optimizer, parameters)
                    bar.update(task, advance=1)
                    continue
                batch = collate(
                    [token_ids[i] for i in rows], tokenizer, [label_ids[i] for i in rows]
                )
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(task, advance=1, loss=loss.item())
    finally:
        wrapped._close()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)
    result = {name: vector.detach().clone() for name, vector in gates.gates.items()}
    return result, account(private, q, gate_config.steps, "gates")
