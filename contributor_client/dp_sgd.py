"""DP-SGD for the adapter and the PHATGOOSE gates, with Opacus.

``moerge train --dp-sgd-epsilon E`` trains the LoRA adapter and its head, then the gates, with
differentially private SGD (Abadi et al. 2016): every step takes a Poisson sample of the
training examples (each with probability ``q = batch_size / n``), computes each example's
gradient (Opacus' ``GradSampleModule``), clips it to ``max_grad_norm`` and adds Gaussian noise of
std ``noise_multiplier * max_grad_norm`` to their sum (Opacus' ``DPOptimizer``). The two runs
add the same noise to their mean gradient (each run's noise multiplier is proportional to its
expected batch; with the default prototype head, below, the same noise multiplier), at the
smallest level for which they compose to (E, delta)-DP under
``dp_accounting``'s PLD accountant, the accountant of the statistics' release
(:mod:`privacy`), so that :func:`privacy.privacy_report` composes all three into one guarantee.

By default the run trains the classification head alone and leaves the LoRA update at zero
(``train_lora=False``): the noise grows with the number of parameters trained (~75k LoRA
entries beside the head's few thousand), and with a few hundred examples the head is what
DP-SGD can afford (BBC news, 600 examples, epsilon 8, batch 64: head + LoRA 22.0% test
accuracy, no DP 89.5%, in an earlier run of benchmarks/dp_sgd.py). ``train_lora=True`` trains
both, for contributors with many more examples.

The head alone is a linear model over frozen features, so :func:`train_head_dp` computes each
training example's features once (the head's input in eval mode, as the coordinator serves
it) and runs DP-SGD on the head over them: each step costs a matrix product instead of a
forward pass, which pays for batches of 256 instead of 64 (less noise per example at the same
epsilon; the accountant prices the higher sampling rate). Two data-independent choices matter
most: the features are centred at the base model's features of the empty text (BERT's pooler
gives every text a large shared component, ~1.0 of a norm of ~1.3 on MiniLM, which would
otherwise dominate every clipped gradient; the centre is folded into the head's bias, so the
saved head reads the raw features), and the head starts at zero. Chosen by 5-fold
cross-validation on the 600 *training* examples of BBC news and Rotten Tomatoes (never their
test splits; two DP seeds per fold): head-only accuracy at epsilon 8 went from 81.7% / 61.4%
(batch 64, uncentred, as before) to 86.3% / 62.3% (batch 256, centred); learning rates of
5e-2 to 2e-1, clipping at 0.3 or 1, 300 steps or full batches all came within a point of it.

The head alone is released by default as noisy class prototypes (``head_mechanism=
"prototypes"``, :func:`private_prototypes`): per class, the sum of its examples' centred
features scaled to norm 1, plus Gaussian noise, each row normalised -- a cosine classifier.
That is one full-batch DP-SGD step (sampling rate 1, clipping norm 1, a linear loss), accounted
as such, where the Poisson-sampled run above takes 150. At epsilon 8 its noise is small against
the sums of a few hundred examples. Chosen by 5-fold cross-validation on the 600 training
examples (four noise draws per fold; the DP-SGD run two): BBC news 87.5% against 85.3% for
the DP-SGD run at epsilon 8, 85.6% against 79.3% at epsilon 4; Rotten Tomatoes 61.5% against
61.7%, and 61.5% against 59.3%. Without noise the prototypes reach 87.8% and 62.0%, a
logistic regression on the same features 88.5% and 61.5%: at epsilon 8 the noise costs the
prototypes little, the classifier's form the rest. Also tried there (BBC news, epsilon 8),
none better than the prototypes: features scaled to norm 1, averaging the iterates (EMA 0.9 /
0.95, the last half), clipping at 0.3 / 0.5, learning rate 0.2, 300 steps, full batches of 540
(82.4% to 85.8%, within 0.6 point of the DP-SGD run or below it), and DP-SGD started from
noisy prototypes, the budget split by the accountant (86.4% at best).
``head_mechanism="sgd"`` keeps the DP-SGD run.

The noise and the Poisson samples of every run here (prototypes, DP-SGD, gates) come from a
generator seeded from the OS's entropy (:func:`noise_generator`), not from the training seed:
anyone who knows that seed (0 by default) could otherwise draw the same noise and subtract
it, or tell which examples each step sampled. ``noise_seed`` fixes it, for tests.

What DP-SGD changes beside the optimizer, because each would otherwise release something
about the data without noise: the head starts at zero (no linear probe fitted on the data),
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
import secrets
import warnings
from collections.abc import Callable, Sequence
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
    # Expected examples per step (Poisson sampling). 256 rather than 64: the noise on the mean
    # gradient falls with the batch faster than the accountant raises the noise multiplier
    # (cross-validated on training data, head only, epsilon 8: BBC news 84% at 64, 86% at 256).
    batch_size: int = 256
    # AdamW on the noisy mean gradient, warm-up + linear decay. High because the noise, not the
    # step size, limits what a step learns (head only, batch 64, uncentred features, BBC news
    # test accuracy: 2e-3 -> 38%, 1e-2 -> 49%, 5e-2 -> 77%; cross-validation kept 5e-2).
    learning_rate: float = 5e-2
    min_steps: int = 150  # at least this many adapter steps (more epochs if the data is small)
    gate_batch_size: int = 64
    # The gates' run, counted in the calibration when they are trained too (set by build).
    gate_steps: int = 0
    gate_examples: int = 0
    noise_multiplier: float | None = None  # set by calibrate(); None until then
    # The gates' noise multiplier when calibrate() priced them with the adapter (None: not).
    gate_noise_multiplier: float | None = None
    # Also train the LoRA factors (else the head alone, the LoRA update staying zero): with a
    # few hundred examples the noise on ~75k LoRA entries swamps them (benchmarks/dp_sgd.py).
    train_lora: bool = False
    # How the head alone is released (train_lora=False): "prototypes", one noisy full-batch
    # step (:func:`private_prototypes`; cross-validated on training data, epsilon 8: BBC news
    # 87.5% against 85.3% for "sgd", Rotten Tomatoes 61.5% / 61.7%; epsilon 4: 85.6% / 79.3%
    # and 61.5% / 59.3%), or "sgd", the Poisson-sampled DP-SGD run of :func:`private_head`.
    head_mechanism: str = "prototypes"
    # The prototypes' logit scale: a data-independent constant (argmax does not depend on it).
    prototype_scale: float = 10.0
    # Seeds the DP noise and the Poisson samples; None (the default) draws the seed from the
    # OS's entropy, so that nobody who knows the training seed can subtract the noise.
    noise_seed: int | None = None

    @property
    def prototypes(self) -> bool:
        """Whether the head is released as noisy class prototypes (one step, no Opacus run)."""
        return not self.train_lora and self.head_mechanism == "prototypes"

    def runs(self, train_count: int, epochs: int) -> list[tuple[float, int, int]]:
        """(sampling rate, steps, expected batch) of the adapter run and, if any, the gates'.

        The prototypes' one step is given the gates' batch, so that calibrate() gives both the
        same noise multiplier (adding a mean gradient's noise to a one-off sum makes no sense).
        """
        batch = self.gate_batch_size if self.prototypes else self.batch_size
        runs = [(*adapter_steps(self, train_count, epochs), batch)]
        if self.gate_steps:
            q = min(1.0, self.gate_batch_size / max(self.gate_examples, 1))
            runs.append((q, self.gate_steps, self.gate_batch_size))
        return runs

    def validate(self) -> None:
        """Refuse a non-positive epsilon, a delta outside (0, 1) and non-positive training
        settings."""
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"DP-SGD epsilon must be a positive number, got {self.epsilon!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"DP-SGD delta must be in (0, 1), got {self.delta!r}")
        for name in (
            "max_grad_norm",
            "batch_size",
            "learning_rate",
            "gate_batch_size",
            "prototype_scale",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"DP-SGD {name} must be positive")
        if self.head_mechanism not in HEAD_MECHANISMS:
            raise ValueError(
                f"DP-SGD head_mechanism must be one of {HEAD_MECHANISMS}, "
                f"got {self.head_mechanism!r}"
            )


#: How the head alone can be released: noisy class prototypes, or a DP-SGD run.
HEAD_MECHANISMS = ("prototypes", "sgd")


def adapter_steps(config: DPSGDConfig, train_count: int, epochs: int) -> tuple[float, int]:
    """Sampling rate and steps of the adapter run over ``train_count`` examples (prototypes:
    one step over all of them)."""
    if config.prototypes:
        return 1.0, 1
    q = min(1.0, config.batch_size / max(train_count, 1))
    return q, max(config.min_steps, math.ceil(epochs / q))


def calibrate(config: DPSGDConfig, runs: Sequence[tuple[float, int, int]]) -> float:
    """The smallest noise for which ``runs`` ((q, steps, expected batch) each) compose to the
    budget of ``config`` (PLD accountant), each run's noise multiplier proportional to its batch
    so that every run adds the same noise to its mean gradient. The first run's multiplier is
    returned and stored in ``config.noise_multiplier``, a second run's (the gates') in
    ``config.gate_noise_multiplier``."""
    import dp_accounting
    from dp_accounting import mechanism_calibration
    from dp_accounting.pld import PLDAccountant

    from moerge.contributor_client.privacy import dp_sgd_event

    config.validate()

    def composed(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent(
            [dp_sgd_event(sigma * b / runs[0][2], q, t) for q, t, b in runs]
        )

    sigma = mechanism_calibration.calibrate_dp_mechanism(
        lambda: PLDAccountant(value_discretization_interval=1e-3),
        composed,
        config.epsilon,
        config.delta,
        mechanism_calibration.LowerEndpointAndGuess(0.05, 1.0),
        tol=1e-3,
    )
    config.noise_multiplier = float(sigma)
    config.gate_noise_multiplier = float(sigma) * runs[1][2] / runs[0][2] if len(runs) > 1 else None
    return config.noise_multiplier


def account(
    config: DPSGDConfig,
    q: float,
    steps: int,
    parameters: str = "",
    max_grad_norm: float | None = None,
    library: str = "opacus",
) -> SGDAccount:
    """The :class:`SGDAccount` of one run at the calibrated noise multiplier."""
    from moerge.contributor_client.privacy import SGDAccount, composed_epsilon, dp_sgd_event

    assert config.noise_multiplier is not None
    epsilon = composed_epsilon([dp_sgd_event(config.noise_multiplier, q, steps)], config.delta)
    return SGDAccount(
        noise_multiplier=config.noise_multiplier,
        sample_rate=q,
        steps=steps,
        max_grad_norm=config.max_grad_norm if max_grad_norm is None else max_grad_norm,
        epsilon=epsilon,
        delta=config.delta,
        parameters=parameters,
        library=library,
    )


#: Opacus' hooks on a frozen base model: the inputs of the first trainable layer need no
#: gradient, which torch reports on every backward pass although nothing is wrong.
_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module"


def noise_generator(config: DPSGDConfig) -> torch.Generator:
    """The generator of a run's noise and Poisson samples: seeded with ``config.noise_seed``, or
    from the OS's entropy when it is None (the default), never from the training seed."""
    seed = secrets.randbits(63) if config.noise_seed is None else config.noise_seed
    return torch.Generator().manual_seed(seed)


def poisson_rows(count: int, q: float, generator: torch.Generator) -> list[int]:
    """Each of ``range(count)`` independently with probability ``q`` (Opacus' DPDataLoader)."""
    return torch.nonzero(torch.rand(count, generator=generator) < q).flatten().tolist()


def private_optimizer(
    parameters: list[torch.nn.Parameter],
    config: DPSGDConfig,
    learning_rate: float,
    generator: torch.Generator,
) -> Any:
    """AdamW wrapped in Opacus' ``DPOptimizer`` (clip each example, sum, add noise, average),
    its noise drawn from ``generator``."""
    from opacus.optimizers import DPOptimizer

    assert config.noise_multiplier is not None
    return DPOptimizer(
        torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0),
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=config.batch_size,
        loss_reduction="mean",
        generator=generator,
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
    """Train LoRA + head of PEFT ``model`` with DP-SGD, a forward pass of the whole model per
    step (``config.train_lora``; the head alone is :func:`train_head_dp`). The noise multiplier
    must be calibrated. Returns the loss of every step and the run's account. ``seed`` (the
    training seed, as :func:`training.train_expert` passes it) does not seed the noise or the
    samples: :func:`noise_generator` does."""
    from opacus import GradSampleModule

    from moerge.contributor_client.batching import collate

    q, steps = adapter_steps(config, len(train_idx), epochs)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    wrapped.train()
    warnings.filterwarnings("ignore", message=_HOOK_WARNING)

    def loss_of(rows: list[int]) -> torch.Tensor:
        chosen = [train_idx[r] for r in rows]
        batch = collate([token_ids[i] for i in chosen], tokenizer, [label_ids[i] for i in chosen])
        labels = batch.pop("labels")
        return torch.nn.functional.cross_entropy(wrapped(**batch).logits.float(), labels)

    trainable = [p for p in model.parameters() if p.requires_grad]
    curve = private_steps(
        wrapped,
        trainable,
        loss_of,
        len(train_idx),
        config,
        steps,
        warmup_fraction,
        "training (DP-SGD)",
        progress,
    )
    return curve, account(config, q, steps, "head+lora")


def private_steps(
    wrapped: Any,
    trainable: list[torch.nn.Parameter],
    loss_of: Callable[[list[int]], torch.Tensor],
    count: int,
    config: DPSGDConfig,
    steps: int,
    warmup_fraction: float,
    what: str,
    progress: bool,
) -> list[float]:
    """``steps`` DP-SGD steps on Poisson samples of ``range(count)`` (``loss_of(rows)`` is the
    mean loss of a sample), AdamW with warm-up and linear decay; closes Opacus' ``wrapped``
    module. The noise and the samples come from :func:`noise_generator`. The loss of every
    non-empty step."""
    from moerge.contributor_client.training_loop import lr_factor, training_progress

    q = min(1.0, config.batch_size / max(count, 1))
    generator = noise_generator(config)
    optimizer = private_optimizer(trainable, config, config.learning_rate, generator)
    warmup = max(1, round(warmup_fraction * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer.original_optimizer, lambda step: lr_factor(step, warmup, steps, "linear")
    )
    curve: list[float] = []
    try:
        with training_progress(progress) as bar:
            task = bar.add_task(what, total=steps, loss=float("nan"))
            for _ in range(steps):
                rows = poisson_rows(count, q, generator)
                if not rows:
                    noisy_empty_step(optimizer, trainable)
                else:
                    loss = loss_of(rows)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    curve.append(loss.item())
                schedule.step()
                window = curve[-20:] or [float("nan")]
                bar.update(task, advance=1, loss=sum(window) / len(window))
    finally:
        wrapped._close()  # removes Opacus' hooks; the module is as before
    return curve


def classification_head(model: Any) -> torch.nn.Linear:
    """The ``Linear`` a (PEFT) classification model trains as its head: PEFT's active copy in
    ``modules_to_save``, or the model's own ``classifier``."""
    head = model.classifier
    active = getattr(head, "modules_to_save", None)
    if active is not None:
        head = active[model.active_adapter]
    if not isinstance(head, torch.nn.Linear):
        raise ValueError("DP-SGD on the head alone needs a classification head that is a Linear")
    return head


def train_head_dp(
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
    """The classification head of ``model`` alone, released with DP over features computed once.

    The features are what the head reads in eval mode (:func:`linear_probe.pooled_features`),
    minus those of the empty text (a data-independent centre, see the module's docstring). By
    default (``config.prototypes``) the head is the noisy class prototypes of
    :func:`private_prototypes`, one Gaussian release; with ``head_mechanism="sgd"`` it starts
    at zero and is trained with Opacus on Poisson batches of the features. Either way it is
    written back with the centre folded into its bias (``W (x - c) + b = W x + (b - W c)``).
    The LoRA update stays zero. Each example's gradient still depends on that example alone,
    so the account is that of the same run on the whole model. ``seed`` does not seed the noise
    or the samples (:func:`noise_generator` does).
    """
    from moerge.contributor_client.batching import encode
    from moerge.contributor_client.linear_probe import pooled_features

    q, steps = adapter_steps(config, len(train_idx), epochs)
    head = classification_head(model)
    raw = pooled_features(model, tokenizer, token_ids, train_idx, config.batch_size)
    empty = encode(tokenizer, [""], 8)  # e.g. BERT's [CLS] [SEP]
    centre = torch.zeros(raw.shape[1])
    if empty[0]:  # a tokenizer without special tokens has no empty text to read
        centre = pooled_features(model, tokenizer, empty, [0], 1)[0].clone()
    targets = torch.tensor([label_ids[i] for i in train_idx])
    if config.prototypes:
        assert config.noise_multiplier is not None
        weight, bias = private_prototypes(
            raw,
            targets,
            head.out_features,
            centre,
            config.noise_multiplier,
            config.prototype_scale,
            noise_generator(config),
        )
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        # one step's clipping norm is the norm of every example's contribution: 1
        return [], account(config, q, steps, "head (prototypes)", 1.0, "torch")
    # clone: pooled_features returns inference tensors, which autograd cannot save
    weight, bias, curve = private_head(
        raw.clone(),
        targets,
        head.out_features,
        centre,
        config,
        steps,
        warmup_fraction,
        progress=progress,
    )
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return curve, account(config, q, steps, "head")


def private_head(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_labels: int,
    centre: torch.Tensor,
    config: DPSGDConfig,
    steps: int,
    warmup_fraction: float,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """A linear head [L, H], [L] over ``features`` [N, H] trained with Opacus' DP-SGD for
    ``steps`` Poisson steps of expected ``config.batch_size``, from zero, on ``features -
    centre``; returned with the centre folded into the bias, so that it reads the raw features
    (``W (x - c) + b = W x + (b - W c)``), with the loss of every non-empty step."""
    from opacus import GradSampleModule

    centred = features - centre
    linear = torch.nn.Linear(features.shape[1], num_labels)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    wrapped = GradSampleModule(linear, batch_first=True, loss_reduction="mean")

    def loss_of(rows: list[int]) -> torch.Tensor:
        chosen = torch.tensor(rows)
        return torch.nn.functional.cross_entropy(wrapped(centred[chosen]), targets[chosen])

    curve = private_steps(
        wrapped,
        list(linear.parameters()),
        loss_of,
        len(centred),
        config,
        steps,
        warmup_fraction,
        "training the head (DP-SGD)",
        progress,
    )
    weight = linear.weight.detach().clone()
    return weight, linear.bias.detach() - weight @ centre, curve


def prototype_sums(
    features: torch.Tensor, targets: torch.Tensor, num_labels: int, centre: torch.Tensor
) -> torch.Tensor:
    """Per class, the sum [L, H] of its examples' centred features scaled to norm 1: one
    example moves it by at most 1 (L2), the sensitivity :func:`private_prototypes` noises."""
    centred = features.float() - centre
    units = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.zeros(num_labels, units.shape[1]).index_add_(0, targets, units)


def private_prototypes(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_labels: int,
    centre: torch.Tensor,
    noise_multiplier: float,
    scale: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head [L, H], [L] of noisy class prototypes over ``features`` [N, H]: a cosine
    classifier, released by one Gaussian mechanism.

    Each example's centred features are scaled to norm 1 (``u_i = (x_i - c) / ||x_i - c||``) and
    added to its class's row, ``S[y_i] += u_i`` (:func:`prototype_sums`); Gaussian noise of std
    ``noise_multiplier`` is added to every entry of ``S`` [L, H]. Adding or removing one example
    moves ``S`` by at most 1 in L2 norm, so this is the Gaussian mechanism with sensitivity 1:
    one full-batch step of DP-SGD (sampling rate 1, clipping norm 1) on the linear loss
    ``-W[y_i] . u_i`` from ``W = 0``, and is accounted as such. The rest is post-processing:
    the rows are scaled to norm ``scale`` and the centre is folded into the bias
    (``W (x - c) = W x - W c``). The head reading the raw features ranks the classes as the
    normalised classifier does: dividing ``x - c`` by its norm multiplies every logit of a text
    by the same positive number.
    """
    sums = prototype_sums(features, targets, num_labels, centre)
    sums += noise_multiplier * torch.randn(sums.shape, generator=generator)
    weight = scale * sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return weight, -(weight @ centre.float())


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
        calibrate(config, [(q, gate_config.steps, config.gate_batch_size)])
    # Priced with the adapter (calibrate), the gates' multiplier is scaled to their batch.
    sigma = config.gate_noise_multiplier or config.noise_multiplier
    token_ids = encode(tokenizer, texts, gate_config.max_length)
    generator = noise_generator(config)
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
    private = DPSGDConfig(
        **{**config.__dict__, "batch_size": config.gate_batch_size, "noise_multiplier": sigma}
    )
    optimizer = private_optimizer(parameters, private, gate_config.learning_rate, generator)
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
