"""Fine-tunes one LoRA expert on the contributor's local data with a plain PyTorch loop.

Classification experts are ``AutoModelForSequenceClassification`` + LoRA (PEFT ``SEQ_CLS``:
PEFT trains and saves the new ``classifier`` head through ``modules_to_save``); causal LM
experts are ``AutoModelForCausalLM`` + LoRA trained with the LM loss: on the whole text, or, when
each text comes with a completion (the data's label field), on the completion's tokens only
(instruction tuning: prompt -> answer). The result is PEFT's own
format, exactly ``adapter_config.json`` and ``adapter_model.safetensors``. For a BERT base such
as all-MiniLM-L6-v2 with the default targets the saved keys are::

    base_model.model.bert.encoder.layer.{i}.attention.self.{query,value}.lora_A.weight  [r, H]
    base_model.model.bert.encoder.layer.{i}.attention.self.{query,value}.lora_B.weight  [H, r]
    base_model.model.classifier.weight                                                  [L, H]
    base_model.model.classifier.bias                                                    [L]

(``L`` labels, in the order of ``TrainResult.label_names``). A causal LM adapter has only the
``lora_A``/``lora_B`` keys, e.g. ``base_model.model.model.layers.{i}.self_attn.q_proj...``.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from moerge.contributor_client.batching import (
    IGNORE_INDEX,
    collate,
    encode,
    encode_completions,
    length_grouped_batches,
    load_tokenizer,
    sorted_batches,
)
from moerge.contributor_client.data import label_order, train_validation_split
from moerge.expert_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TASK_TYPES = ("classification", "causal_lm")


@dataclass
class TrainConfig:
    """How to fine-tune one expert. Defaults suit all-MiniLM-L6-v2 classification on a CPU."""

    base_model: str  # local folder of the base model (nothing is ever downloaded)
    task_type: str = "classification"  # "classification" (LoRA + head) or "causal_lm"
    lora_rank: int = 8  # r of every LoRA module
    lora_alpha: float = 16  # LoRA scaling numerator: delta W = (alpha / r) * B A
    lora_dropout: float = 0.1  # dropout on the LoRA path's input while training
    # Modules to adapt; None = PEFT's default for the architecture ("query"/"value" for BERT,
    # "q_proj"/"v_proj" for Llama).
    target_modules: list[str] | None = None
    epochs: int = 3  # passes over the training split
    batch_size: int = 16  # examples per optimizer step
    learning_rate: float = 1e-3  # AdamW peak learning rate (linear warm-up, then linear decay)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_fraction: float = 0.06  # share of the steps spent warming the learning rate up
    max_length: int = 128  # tokens kept per example (longer texts are truncated)
    # Run forward passes under bfloat16 autocast (weights stay float32): about 2x faster on
    # long texts with CPUs that have AVX512-BF16 or AMX, slower on CPUs without them.
    bf16: bool = False
    seed: int = 0  # seeds the split, the initialisation, dropout and batch order
    validation_fraction: float = 0.1  # share of each label held out to report accuracy
    max_examples: int | None = None  # use a seeded random subset of this size (None: all)
    # Name recorded as ``base_model_name_or_path`` in adapter_config.json instead of the local
    # folder (e.g. "sentence-transformers/all-MiniLM-L6-v2"); "" records ``base_model``.
    base_model_id: str = ""
    progress_window: int = 20  # steps averaged in the progress bar's running loss

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        positive = {
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "progress_window": self.progress_window,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.max_examples is not None and self.max_examples < 2:
            raise ValueError(f"max_examples must be at least 2, got {self.max_examples}")


@dataclass
class TrainResult:
    """What training reports back (nothing here is per-example)."""

    label_names: list[str]  # head output i predicts label_names[i]; [] for causal LM
    train_loss_curve: list[float]  # training loss of every optimizer step
    val_accuracy: float | None  # held-out accuracy (next-token accuracy for causal LM)
    val_count: int  # held-out examples behind val_accuracy (0: none held out)
    seconds: float  # wall time of the whole call
    train_count: int = 0  # examples trained on


def train_expert(
    texts: Sequence[str],
    labels: Sequence[str] | None,
    config: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA expert and save it (PEFT format) into ``out_dir``.

    The same inputs and ``config.seed`` give bit-identical weights on the same machine.
    ``labels`` are required for classification (at least two distinct). For causal LM they
    are optional completions: with them the expert learns to continue ``texts[i]`` with
    ``labels[i]`` (loss on the completion's tokens and the EOS after it only); without them
    it learns the texts themselves. The caller's global torch RNG state is left untouched.
    """
    started = time.perf_counter()
    config.validate()
    texts, labels = select_examples(texts, labels, config.max_examples, config.seed)
    causal_lm = config.task_type == "causal_lm"
    label_names: list[str] = []
    label_ids: list[int] | None = None
    if not causal_lm:
        label_names, label_ids = _label_ids(labels)
    split_labels = None if causal_lm else labels
    train_idx, val_idx = train_validation_split(
        split_labels, len(texts), config.validation_fraction, config.seed
    )
    tokenizer = load_tokenizer(config.base_model)
    prompt_lengths = None
    if causal_lm and labels is not None:
        token_ids, prompt_lengths = encode_completions(
            tokenizer, texts, labels, config.max_length
        )
    else:
        token_ids = encode(tokenizer, texts, config.max_length)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        base = load_task_model(config.base_model, config.task_type, label_names, tokenizer)
        model = get_peft_model(base, lora_config(config))
        curve = _train(
            model, tokenizer, token_ids, label_ids, train_idx, config, progress, prompt_lengths
        )

    val_accuracy = None
    if val_idx:
        val_accuracy = evaluate(
            model, tokenizer, token_ids, label_ids, val_idx, config.batch_size, causal_lm,
            config.bf16, prompt_lengths,
        )
    save_adapter(model, out_dir, config.base_model_id or config.base_model)
    return TrainResult(
        label_names=label_names,
        train_loss_curve=curve,
        val_accuracy=val_accuracy,
        val_count=len(val_idx),
        seconds=time.perf_counter() - started,
        train_count=len(train_idx),
    )


def load_task_model(
    base_model: str,
    task_type: str,
    label_names: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
) -> PreTrainedModel:
    """The base model with the task's head, in float32 (CPU training and exact statistics).

    A classification head is new (randomly initialised from the torch RNG) and named after
    ``label_names``; a causal LM keeps its own LM head.
    """
    if task_type == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model,
            dtype=torch.float32,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    if model.config.pad_token_id is None:
        # Decoder classifiers find each example's last token through the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def lora_config(config: TrainConfig) -> LoraConfig:
    """PEFT's LoRA config for ``config`` (``SEQ_CLS`` adds the head to ``modules_to_save``)."""
    targets = None if config.target_modules is None else list(config.target_modules)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM if config.task_type == "causal_lm" else TaskType.SEQ_CLS,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
    )


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
) -> float:
    """Accuracy on ``indices``: of the predicted label, or for causal LM of every next token
    (of the completion's tokens only, given ``prompt_lengths``)."""
    model.eval()
    correct = 0
    total = 0
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
            predicted = logits[:, :-1].argmax(dim=-1)  # [B, T-1]: token t+1 predicted at t
            target = labels[:, 1:]  # [B, T-1]
            counted = target != IGNORE_INDEX
            correct += int(((predicted == target) & counted).sum())
            total += int(counted.sum())
        else:
            correct += int((logits.argmax(dim=-1) == labels).sum())  # logits [B, L]
            total += len(chosen)
    return correct / max(total, 1)


def save_adapter(model: PeftModel, out_dir: str | Path, base_model_id: str) -> None:
    """Write exactly ``adapter_config.json`` and ``adapter_model.safetensors`` to ``out_dir``.

    ``save_pretrained`` also writes a README model card; saving through a temporary folder
    keeps only PEFT's two files and never touches anything else in ``out_dir``. Embedding
    matrices are never saved (the vocabulary is never resized), which also stops PEFT from
    looking ``base_model_id`` up on the Hub.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base_model_id
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".save-") as tmp:
        model.save_pretrained(tmp, save_embedding_layers=False)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            os.replace(Path(tmp) / name, out_dir / name)


def _train(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int]],
    label_ids: Sequence[int] | None,
    train_idx: Sequence[int],
    config: TrainConfig,
    progress: bool,
    prompt_lengths: Sequence[int] | None = None,
) -> list[float]:
    """AdamW over the trainable (LoRA + head) parameters; returns the loss of every step."""
    generator = torch.Generator().manual_seed(config.seed)
    lengths = [len(token_ids[i]) for i in train_idx]
    total_steps = math.ceil(len(train_idx) / config.batch_size) * config.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = max(1, round(config.warmup_fraction * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, (total_steps - step) / max(1, total_steps - warmup)),
    )
    causal_lm = config.task_type == "causal_lm"
    curve: list[float] = []
    model.train()
    with training_progress(progress) as bar:
        task = bar.add_task("training", total=total_steps, loss=float("nan"))
        for epoch in range(config.epochs):
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
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                    loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                curve.append(loss.item())
                window = curve[-config.progress_window :]
                bar.update(
                    task,
                    advance=1,
                    description=f"epoch {epoch + 1}/{config.epochs}",
                    loss=sum(window) / len(window),
                )
    return curve


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


def select_examples(
    texts: Sequence[str], labels: Sequence[str] | None, limit: int | None, seed: int
) -> tuple[list[str], list[str] | None]:
    """The examples training uses: all, or a seeded random subset of ``limit`` (file order)."""
    texts = list(texts)
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if limit is None or limit >= len(texts):
        return texts, None if labels is None else list(labels)
    keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
    return [texts[i] for i in keep], None if labels is None else [labels[i] for i in keep]


def _label_ids(labels: Sequence[str] | None) -> tuple[list[str], list[int]]:
    if labels is None:
        raise ValueError("classification needs a label for every example (none were given)")
    names = label_order(labels)
    if len(names) < 2:
        raise ValueError(f"classification needs at least two distinct labels, got {names}")
    index = {name: i for i, name in enumerate(names)}
    return names, [index[label] for label in labels]
