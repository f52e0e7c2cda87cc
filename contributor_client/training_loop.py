"""The optimisation of one expert: AdamW over LoRA + head, its schedule, early stopping.

:func:`tune_adapter` runs the steps :class:`~.recipe.TrainConfig` asks for (at least
``min_steps``), with a class-weighted loss (:func:`class_weight_vector`), warm-up then linear or
cosine decay (:func:`lr_factor`), and, with early stopping, keeps the best validation checkpoint
by :func:`evaluate`. :func:`~.training.train_expert` prepares the data and the model around it;
DP-SGD (:mod:`.dp_sgd`) and the gates (:mod:`.gates`) share its schedule and progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import PreTrainedTokenizerBase

from moerge.contributor_client.batching import (
    IGNORE_INDEX,
    collate,
    length_grouped_batches,
    sorted_batches,
)

if TYPE_CHECKING:
    from peft import PeftModel

    from moerge.contributor_client.recipe import TrainConfig


def class_weight_vector(
    train_label_ids: Sequence[int], num_labels: int, weighting: str
) -> torch.Tensor | None:
    """Loss weight of each label [L] from its training count ``n_c`` (None for "none").

    "balanced" is ``n / (L n_c)`` (every class weighs the same in total); "sqrt" is its
    square root, which lifts rare classes out of the majority's shadow without trading much
    plain accuracy for balanced accuracy. Labels absent from training count as one example.
    """
    if weighting == "none":
        return None
    counts = torch.bincount(torch.tensor(list(train_label_ids)), minlength=num_labels)
    counts = counts.double().clamp_min(1.0)  # [L]
    weights = counts.sum() / (num_labels * counts)
    return (weights.sqrt() if weighting == "sqrt" else weights).float()


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int]],
    label_ids: Sequence[int] | None,
    indices: Sequence[int],
    batch_size: int,
    causal_lm: bool,
    bf16: bool = False,
    prompt_lengths: Sequence[int] | None = None,
) -> tuple[float, float]:
    """Accuracy and mean unweighted cross-entropy on ``indices``: of the predicted label (loss
    per example), or for causal LM of every next token (of the completion's tokens only, given
    ``prompt_lengths``; loss per token)."""
    model.eval()
    correct = 0
    total = 0
    loss_sum = 0.0
    for rows in sorted_batches([len(token_ids[i]) for i in indices], batch_size):
        chosen = [indices[r] for r in rows]
        batch = collate(
            [token_ids[i] for i in chosen],
            tokenizer,
            None if label_ids is None else [label_ids[i] for i in chosen],
            causal_lm=causal_lm,
            prompt_lengths=None if prompt_lengths is None else [prompt_lengths[i] for i in chosen],
        )
        labels = batch.pop("labels")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch).logits.float()
        if causal_lm:
            logits = logits[:, :-1]  # [B, T-1, V]: token t+1 predicted at t
            target = labels[:, 1:]  # [B, T-1]
            counted = target != IGNORE_INDEX
            correct += int(((logits.argmax(dim=-1) == target) & counted).sum())
            total += int(counted.sum())
            loss_sum += float(
                F.cross_entropy(logits.transpose(1, 2), target, reduction="sum")
            )  # ignore_index defaults to IGNORE_INDEX
        else:
            correct += int((logits.argmax(dim=-1) == labels).sum())  # logits [B, L]
            total += len(chosen)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
    return correct / max(total, 1), loss_sum / max(total, 1)


def tune_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int]],
    label_ids: Sequence[int] | None,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    config: TrainConfig,
    progress: bool,
    prompt_lengths: Sequence[int] | None = None,
    class_weights: torch.Tensor | None = None,
) -> tuple[list[float], int | None]:
    """AdamW over the trainable (LoRA + head) parameters.

    Returns the loss of every step and, with early stopping, the step of the restored
    checkpoint (0: the starting point, e.g. the linear probe, was never beaten).
    """
    generator = torch.Generator().manual_seed(config.seed)
    lengths = [len(token_ids[i]) for i in train_idx]
    per_epoch = math.ceil(len(train_idx) / config.batch_size)
    causal_lm = config.task_type == "causal_lm"
    # Causal LM steps are many times dearer (a 135M+ decoder): min_steps is for classifiers.
    total_steps = max(per_epoch * config.epochs, 0 if causal_lm else config.min_steps)
    epochs = math.ceil(total_steps / per_epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    warmup = max(1, round(config.warmup_fraction * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, config.lr_schedule)
    )
    stopper = (
        _EarlyStopping(model, tokenizer, token_ids, label_ids, val_idx, config, prompt_lengths)
        if config.early_stopping and val_idx
        else None
    )
    eval_every = config.eval_every or per_epoch
    curve: list[float] = []
    step = 0
    if stopper is not None:
        stopper.check(0)
    model.train()
    with training_progress(progress) as bar:
        task = bar.add_task("training", total=total_steps, loss=float("nan"))
        for epoch in range(epochs):
            for rows in length_grouped_batches(lengths, config.batch_size, generator):
                chosen = [train_idx[r] for r in rows]
                batch = collate(
                    [token_ids[i] for i in chosen],
                    tokenizer,
                    None if label_ids is None else [label_ids[i] for i in chosen],
                    causal_lm=causal_lm,
                    prompt_lengths=(
                        None if prompt_lengths is None else [prompt_lengths[i] for i in chosen]
                    ),
                )
                labels = None if causal_lm else batch.pop("labels")
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                    output = model(**batch)
                    if labels is None:  # a causal LM: the model's loss on the completion
                        loss = output.loss
                    else:
                        loss = F.cross_entropy(output.logits.float(), labels, weight=class_weights)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                curve.append(loss.item())
                step += 1
                window = curve[-config.progress_window :]
                bar.update(
                    task,
                    advance=1,
                    description=f"epoch {epoch + 1}/{epochs}",
                    loss=sum(window) / len(window),
                )
                if stopper is not None and (step % eval_every == 0 or step == total_steps):
                    stopper.check(step)
                    model.train()
                if step >= total_steps or (stopper is not None and stopper.exhausted):
                    break
            if step >= total_steps or (stopper is not None and stopper.exhausted):
                break
    if stopper is None:
        return curve, None
    return curve, stopper.restore()


def _parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, object]]:
    """The trainable parameters, the LoRA factors at ``learning_rate`` and the head (PEFT's
    ``modules_to_save`` copy) at ``head_learning_rate``."""
    head_lr = config.head_learning_rate
    lora: list[torch.nn.Parameter] = []
    head: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (head if "modules_to_save" in name else lora).append(parameter)
    if head_lr is None or not head:
        return [{"params": lora + head}]
    return [{"params": lora}, {"params": head, "lr": head_lr}]


def lr_factor(step: int, warmup: int, total: int, shape: str) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then linear or cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return (total - step) / max(1, total - warmup)


class _EarlyStopping:
    """Keeps the trainable weights of the best validation evaluation so far.

    Best means highest accuracy, ties broken by lower loss: on small validation splits
    accuracy moves in coarse steps, and the loss tells apart checkpoints it cannot.
    """

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        token_ids: Sequence[Sequence[int]],
        label_ids: Sequence[int] | None,
        val_idx: Sequence[int],
        config: TrainConfig,
        prompt_lengths: Sequence[int] | None,
    ) -> None:
        self.model, self.config = model, config
        self.evaluate_args = (tokenizer, token_ids, label_ids, val_idx, config.batch_size)
        self.prompt_lengths = prompt_lengths
        self.best: tuple[float, float] | None = None
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] = {}
        self.stale = 0

    @property
    def exhausted(self) -> bool:
        return self.stale >= self.config.patience

    def check(self, step: int) -> None:
        accuracy, loss = evaluate(
            self.model,
            *self.evaluate_args,
            self.config.task_type == "causal_lm",
            self.config.bf16,
            self.prompt_lengths,
        )
        key = (accuracy, -loss)
        if self.best is not None and key <= self.best:
            self.stale += 1
            return
        self.best, self.best_step, self.stale = key, step, 0
        self.best_state = {
            name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad
        }

    def restore(self) -> int:
        """Put the best weights back; the step they were taken at."""
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                parameters[name].copy_(value)
        return self.best_step


def training_progress(enabled: bool) -> Progress:
    """A rich progress bar (on stderr) showing epoch, step, running loss and time left."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps  loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
