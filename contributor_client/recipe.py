"""How to fine-tune one expert: :class:`TrainConfig` and the named :data:`RECIPES`.

The default classification recipe (docs/training.md) is LP-FT (Kumar et al. 2022): the head
starts as a logistic-regression linear probe fitted on the frozen pooled embeddings the head
reads (:mod:`.linear_probe`), so tuning begins from the probe instead of from noise and does
not distort the features early on; then LoRA + head are tuned at a rate suited to LoRA (3e-3;
the head's may be set apart) with warm-up and linear (or cosine) decay, for at least
``min_steps`` optimizer steps (small data sets get enough updates), with a class-weighted loss,
and the best validation checkpoint is restored (early stopping; :mod:`.training_loop`); when
that is the probe itself, it is refitted on all examples (``probe_refit``).
``RECIPES["legacy"]`` gives back the earlier recipe (random head, fixed epochs, unweighted
loss, last step kept). Every field can be overridden (``moerge train --help``).
"""

from __future__ import annotations

from dataclasses import dataclass

TASK_TYPES = ("classification", "causal_lm")
SCHEDULES = ("linear", "cosine")
CLASS_WEIGHTINGS = ("none", "sqrt", "balanced")

#: Named presets of :class:`TrainConfig` fields; "default" is the dataclass defaults.
RECIPES: dict[str, dict[str, object]] = {
    "default": {},
    # The default recipe before LP-FT: random head, fixed epochs, unweighted loss, last step kept.
    "legacy": {
        "learning_rate": 1e-3,
        "warmup_fraction": 0.06,
        "lr_schedule": "linear",
        "min_steps": 0,
        "probe_init": False,
        "class_weighting": "none",
        "early_stopping": False,
    },
}


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
    epochs: int = 3  # passes over the training split (at least; see min_steps)
    batch_size: int = 16  # examples per optimizer step
    # AdamW peak learning rate of the LoRA factors (warm-up, then lr_schedule decay). LoRA
    # needs rates well above full fine-tuning's (Hu et al. 2021: 4e-4..5e-4 for RoBERTa-base
    # at rank 8, over thousands of steps); with ~100 steps on a small encoder, 3e-3 beat 5e-4
    # by 1-5 points on the demo tasks (benchmarks/results/expert_quality.md).
    learning_rate: float = 3e-3
    # Peak learning rate of the classification head (None: learning_rate). LP-FT's head
    # starts at the probe's optimum, so it may move slower than the LoRA factors.
    head_learning_rate: float | None = None
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_fraction: float = 0.1  # share of the steps spent warming the learning rate up
    lr_schedule: str = "linear"  # decay after warm-up: "linear" or "cosine" (to zero)
    # Classification: at least this many optimizer steps, however few the examples (more
    # epochs if needed; causal LM training keeps to `epochs`): 200 examples at batch 16 are
    # only 36 steps in 3 epochs. At 3e-3, 60 steps did as well as 100 on the 200-example
    # screens, and 40 as well as 60 on all five public tasks (mean +3.4 pt over the probe
    # both) in 1.23-1.50x the legacy recipe's time instead of 1.79-2.18x
    # (benchmarks/results/expert_quality.md).
    min_steps: int = 40
    # LP-FT: start the classification head from a logistic regression fitted on the frozen
    # pooled embeddings the head reads (the head must be a Linear named "classifier").
    probe_init: bool = True
    probe_c: float = 1.0  # inverse L2 strength of the probe (scikit-learn's C)
    # When early stopping keeps the probe (no tuned checkpoint beat it on validation, so the
    # LoRA update stays zero), refit the probe on all examples, validation split included,
    # as the final head; the reported validation accuracy is the training-split probe's.
    probe_refit: bool = True
    # Loss weight of class c: "balanced" n / (L n_c), "sqrt" its square root, "none" 1.
    class_weighting: str = "sqrt"
    # Evaluate on the validation split every eval_every steps (0: once per epoch) and restore
    # the best checkpoint (accuracy, then loss) at the end; stop after `patience` evaluations
    # without improvement. Needs validation_fraction > 0.
    early_stopping: bool = True
    eval_every: int = 0
    patience: int = 4
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
            "probe_c": self.probe_c,
            "patience": self.patience,
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
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(
                f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {self.class_weighting!r}"
            )
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise ValueError(
                f"head_learning_rate must be positive, got {self.head_learning_rate!r}"
            )
        if self.min_steps < 0 or self.eval_every < 0:
            raise ValueError("min_steps and eval_every must be non-negative")
        if self.max_examples is not None and self.max_examples < 2:
            raise ValueError(f"max_examples must be at least 2, got {self.max_examples}")
