"""The local half of :meth:`moerge.Client.train` and :meth:`~moerge.Client.contribute`.

Training happens on the contributor's machine against the coordinator's base model: these
functions check that the local base model has the coordinator's revision, apply its LoRA limits
to the options, and build the expert folder with :func:`~moerge.contributor_client.build.
build_expert`. torch, transformers and PEFT are imported only when an expert is built.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from moerge.errors import MoergeError
from moerge.results import BaseModel

if TYPE_CHECKING:
    from moerge.contributor_client.build import BuildReport
    from moerge.contributor_client.dp_sgd import DPSGDConfig
    from moerge.contributor_client.gates import GateConfig
    from moerge.contributor_client.privacy import DPConfig
    from moerge.contributor_client.recipe import TrainConfig


@dataclasses.dataclass
class TrainOptions:
    """How to train an expert and summarise its data; every field has the CLI's default."""

    task_type: str | None = None  # "classification" | "causal_lm"; None: the coordinator's
    epochs: int = 3  # passes over the training split (at least; see min_steps)
    rank: int = 8  # LoRA rank (the coordinator sets a maximum)
    # The training recipe (training.RECIPES: "default" = LP-FT, or "legacy"); the fields
    # below left at None take the recipe's value (see TrainConfig for what each does).
    recipe: str = "default"
    learning_rate: float | None = None  # AdamW peak learning rate
    head_learning_rate: float | None = None  # the classification head's (None: learning_rate)
    min_steps: int | None = None  # at least this many optimizer steps
    lr_schedule: str | None = None  # "linear" | "cosine" decay after warm-up
    warmup_fraction: float | None = None  # share of the steps warming up
    class_weighting: str | None = None  # "none" | "sqrt" | "balanced"
    probe_init: bool | None = None  # start the head from a linear probe (LP-FT)
    early_stopping: bool | None = None  # restore the best validation checkpoint
    batch_size: int = 16  # examples per step
    max_length: int = 128  # tokens kept per example
    seed: int = 0  # seeds the split, the initialisation and the order
    max_examples: int | None = None  # train on a seeded subset of this size
    target_modules: list[str] | None = None  # None: every module the coordinator allows
    text_field: str = "text"  # the data file's field holding the text
    label_field: str = "label"  # ... and the label ("" for causal LM data)
    stats_rank: int = 16  # covariance rank of the statistics
    gates: bool = True  # train PHATGOOSE gates
    gate_steps: int = 100  # PHATGOOSE gate training steps
    gate_learning_rate: float | None = None  # None: GateConfig's default (5e-2)
    # Differential privacy of the statistics: on by default (None: privacy.DEFAULT_EPSILON);
    # no_dp=True is the explicit opt-out, recorded in statistics.json and by the coordinator.
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    no_dp: bool = False
    # DP-SGD for the adapter and the gates together (None: trained without DP).
    dp_sgd_epsilon: float | None = None
    dp_sgd_delta: float = 1e-5


#: TrainOptions fields that override the recipe's TrainConfig value when not None.
RECIPE_OPTIONS = (
    "learning_rate",
    "head_learning_rate",
    "min_steps",
    "lr_schedule",
    "warmup_fraction",
    "class_weighting",
    "probe_init",
    "early_stopping",
)


def local_base_model(base_model: str | None, info: BaseModel | None) -> str:
    """The local base model folder; refused when its revision is not the coordinator's."""
    from moerge.base_model import default_base_model, model_revision

    path = base_model or default_base_model()
    if not path:
        raise MoergeError.invalid("no base model: pass base_model (--base-model PATH)")
    if info is None:
        return path
    local = model_revision(path)
    if local != info.revision:
        raise MoergeError.precondition(
            f"the coordinator serves {info.base_model_id} revision {info.revision[:12]}, but "
            f"{path} has revision {local[:12]}: train against the coordinator's base model "
            "(--base-model PATH)"
        )
    return path


def train_config(path: str, info: BaseModel | None, options: TrainOptions) -> TrainConfig:
    """The :class:`TrainConfig` for ``options``, within the coordinator's limits (``info``)."""
    from moerge.contributor_client.recipe import RECIPES, TrainConfig

    if options.recipe not in RECIPES:
        raise MoergeError.invalid(f"--recipe must be one of {sorted(RECIPES)}")
    chosen = {
        name: getattr(options, name)
        for name in RECIPE_OPTIONS
        if getattr(options, name) is not None
    }
    targets, base_model_id, task_type = options.target_modules, "", options.task_type
    if info is not None:
        if options.rank > info.max_lora_rank:
            raise MoergeError.invalid(
                f"--rank {options.rank} exceeds the coordinator's maximum of {info.max_lora_rank}"
            )
        allowed = list(info.allowed_target_modules)
        targets = targets or allowed
        refused = [t for t in targets if t not in allowed]
        if refused:
            raise MoergeError.invalid(
                f"target modules {refused} are not allowed (allowed: {allowed})"
            )
        task_type = task_type or info.task_type
        base_model_id = info.base_model_id
    config = TrainConfig(
        base_model=path,
        task_type=task_type or "classification",
        lora_rank=options.rank,
        lora_alpha=2 * options.rank,
        target_modules=targets,
        epochs=options.epochs,
        batch_size=options.batch_size,
        max_length=options.max_length,
        seed=options.seed,
        max_examples=options.max_examples,
        base_model_id=base_model_id,
    )
    config = dataclasses.replace(config, **{**RECIPES[options.recipe], **chosen})
    try:
        config.validate()
    except ValueError as exc:
        raise MoergeError.invalid(str(exc)) from None
    return config


def build(
    data: str | Path,
    out: str | Path,
    task_name: str,
    description: str,
    options: TrainOptions,
    config: TrainConfig,
    info: BaseModel | None,
    progress: bool,
) -> BuildReport:
    """Train + gates + statistics into ``out``; a bad data file is ``INVALID_ARGUMENT``."""
    from moerge.contributor_client.build import build_expert

    try:
        gates = gate_config(options)  # a bad value fails here, not after training the expert
        dp, dp_sgd = privacy_options(options)
        return build_expert(
            data,
            out,
            task_name,
            config,
            task_description=description,
            text_field=options.text_field,
            label_field=options.label_field or None,
            with_gates=options.gates,
            gate_config=gates,
            dp=dp,
            no_dp=options.no_dp,
            dp_sgd=dp_sgd,
            statistics_rank=options.stats_rank,
            progress=progress,
            base_model_revision=info.revision if info else "",
        )
    except (ValueError, FileNotFoundError) as exc:
        raise MoergeError.invalid(str(exc)) from None


def gate_config(options: TrainOptions) -> GateConfig:
    """The PHATGOOSE gates' ``GateConfig`` of ``options``; when gates are trained, validated
    (``ValueError``) before anything is."""
    from moerge.contributor_client.gates import GateConfig

    gates = GateConfig(steps=options.gate_steps, max_length=options.max_length, seed=options.seed)
    if options.gate_learning_rate is not None:
        gates.learning_rate = options.gate_learning_rate
    if options.gates:
        gates.validate()
    return gates


def privacy_options(options: TrainOptions) -> tuple[DPConfig | None, DPSGDConfig | None]:
    """The statistics' ``DPConfig`` (None: the default budget, or the opt-out) and the
    ``DPSGDConfig`` (None: no DP-SGD) of ``options``; ``ValueError`` when they contradict."""
    from moerge.contributor_client.dp_sgd import DPSGDConfig
    from moerge.contributor_client.privacy import DEFAULT_EPSILON, DPConfig

    if options.no_dp and options.dp_epsilon is not None:
        raise ValueError("--no-dp and --dp-epsilon contradict: choose one")
    dp: DPConfig | None = None
    if not options.no_dp:
        dp = DPConfig(epsilon=options.dp_epsilon or DEFAULT_EPSILON, delta=options.dp_delta)
        dp.validate()
    dp_sgd: DPSGDConfig | None = None
    if options.dp_sgd_epsilon is not None:
        dp_sgd = DPSGDConfig(epsilon=options.dp_sgd_epsilon, delta=options.dp_sgd_delta)
        dp_sgd.validate()
    return dp, dp_sgd
