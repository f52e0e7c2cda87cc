"""``moerge train``, ``moerge stats`` and ``moerge contribute``: local data -> expert folder.

Before training, the coordinator is asked (``GetBaseModel``) which base model, revision, LoRA
targets and maximum rank experts must use; training against a local base model whose weights
differ from the coordinator's is refused. ``--offline`` skips the question (for experiments).

Progress bars go to stderr, so they are shown with ``--json`` too: stdout holds only the JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from moerge.cli.expert_report import print_report, quality_rows, quality_warnings
from moerge.cli.options import (
    Coordinator,
    Json,
    TlsCa,
    Token,
    Transport,
    TransportChoice,
)
from moerge.cli.output import emit_json, err_console, error
from moerge.cli.rpc import guarded
from moerge.contributor_client.connection import Target

if TYPE_CHECKING:
    from moerge.contributor_client.build import BuildReport
    from moerge.contributor_client.privacy import DPConfig
    from moerge.contributor_client.training import TrainConfig
    from moerge.results import BaseModel

T = TypeVar("T")

Data = Annotated[Path, typer.Argument(help="JSONL, CSV or Parquet file of your examples")]
TaskName = Annotated[str, typer.Option("--task-name", help="what the expert is for")]
# The training recipe (docs/training.md); options left unset take the recipe's value.
Recipe = Annotated[str, typer.Option(help="training recipe: default (LP-FT) | legacy")]
LearningRate = Annotated[
    float | None, typer.Option("--lr", help="AdamW peak learning rate [recipe's]")
]
HeadLearningRate = Annotated[
    float | None,
    typer.Option("--head-lr", help="peak learning rate of the classification head [--lr]"),
]
GateLearningRate = Annotated[
    float | None,
    typer.Option("--gate-lr", help="PHATGOOSE gates' AdamW learning rate [5e-2]"),
]
MinSteps = Annotated[int | None, typer.Option(help="at least this many optimizer steps")]
LrSchedule = Annotated[str | None, typer.Option(help="decay after warm-up: linear | cosine")]
ClassWeighting = Annotated[
    str | None, typer.Option(help="loss weight per label: none | sqrt | balanced")
]
ProbeInit = Annotated[
    bool | None,
    typer.Option("--probe-init/--no-probe-init", help="start the head from a linear probe"),
]
EarlyStopping = Annotated[
    bool | None,
    typer.Option(
        "--early-stopping/--no-early-stopping", help="restore the best validation checkpoint"
    ),
]


def agreed_base_model(
    base_model: str | None, offline: bool, target: Target
) -> tuple[str, BaseModel | None]:
    """The local base model folder, checked against the coordinator's revision."""
    from moerge.client import Client
    from moerge.client_training import local_base_model

    api = Client()
    api.target = target
    with api:
        info = None if offline else guarded(api.base_model)
    return _or_exit(lambda: local_base_model(base_model, info)), info


def _or_exit(thunk: Callable[[], T]) -> T:
    """A :class:`~moerge.MoergeError` found locally (bad options, bad data) exits with 2."""
    from moerge.errors import MoergeError

    try:
        return thunk()
    except MoergeError as exc:
        error(exc.message)
        raise typer.Exit(2) from None


def _train_config(
    base_model: str,
    info: BaseModel | None,
    task_type: str | None,
    epochs: int,
    rank: int,
    learning_rate: float | None,
    batch_size: int,
    max_length: int,
    seed: int,
    max_examples: int | None,
    target_modules: list[str] | None,
    recipe: dict[str, object],
) -> TrainConfig:
    from moerge.client_training import TrainOptions, train_config

    options = TrainOptions(
        **recipe,  # type: ignore[arg-type]
        task_type=task_type,
        epochs=epochs,
        rank=rank,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        max_examples=max_examples,
        target_modules=target_modules,
    )
    return _or_exit(lambda: train_config(base_model, info, options))


# Differential privacy (docs/security.md): the statistics are DP by default; --no-dp opts out.
DpEpsilon = Annotated[
    float | None,
    typer.Option(help="DP epsilon of the statistics (default 8; docs/security.md)"),
]
DpDelta = Annotated[float, typer.Option(help="DP delta of the statistics")]
NoDp = Annotated[
    bool,
    typer.Option(
        "--no-dp",
        help="release the statistics WITHOUT differential privacy (recorded and shown by the "
        "coordinator; needs at least 50 examples)",
    ),
]
DpSgdEpsilon = Annotated[
    float | None,
    typer.Option(help="train the adapter and gates with DP-SGD (Opacus) at this epsilon"),
]
DpSgdDelta = Annotated[float, typer.Option(help="DP-SGD delta")]


@dataclass
class Privacy:
    """The privacy options of a command, as given."""

    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    no_dp: bool = False
    dp_sgd_epsilon: float | None = None
    dp_sgd_delta: float = 1e-5

    def statistics(self) -> DPConfig | None:
        """The statistics' ``DPConfig`` (None only with --no-dp); bad options exit with 2."""
        from moerge.client_training import TrainOptions, privacy_options

        options = TrainOptions(**vars(self))
        try:
            return privacy_options(options)[0]
        except ValueError as exc:
            error(exc)
            raise typer.Exit(2) from None


def _build(
    data: Path,
    out: Path,
    task_name: str,
    config: TrainConfig,
    info: BaseModel | None,
    description: str,
    text_field: str,
    label_field: str,
    with_gates: bool,
    gate_steps: int,
    gate_learning_rate: float | None,
    max_length: int,
    seed: int,
    privacy: Privacy,
    stats_rank: int,
    *,
    progress: bool,
) -> BuildReport:
    """Train + gates + statistics into ``out``; a bad data file exits with its message."""
    from moerge.client_training import TrainOptions, build

    options = TrainOptions(
        max_length=max_length,
        seed=seed,
        text_field=text_field,
        label_field=label_field,
        stats_rank=stats_rank,
        gates=with_gates,
        gate_steps=gate_steps,
        gate_learning_rate=gate_learning_rate,
        **vars(privacy),
    )
    return _or_exit(
        lambda: build(data, out, task_name, description, options, config, info, progress)
    )


def _recipe(
    recipe: str,
    head_learning_rate: float | None,
    min_steps: int | None,
    lr_schedule: str | None,
    class_weighting: str | None,
    probe_init: bool | None,
    early_stopping: bool | None,
) -> dict[str, object]:
    return {
        "recipe": recipe,
        "head_learning_rate": head_learning_rate,
        "min_steps": min_steps,
        "lr_schedule": lr_schedule,
        "class_weighting": class_weighting,
        "probe_init": probe_init,
        "early_stopping": early_stopping,
    }


def train(
    data: Data,
    task_name: TaskName,
    out: Annotated[Path, typer.Option("--out", "-o", help="expert folder to write")] = Path(
        "expert"
    ),
    description: Annotated[str, typer.Option(help="task description")] = "",
    text_field: Annotated[str, typer.Option(help="field holding the text")] = "text",
    label_field: Annotated[str, typer.Option(help="field holding the label")] = "label",
    task_type: Annotated[str | None, typer.Option(help="classification | causal_lm")] = None,
    epochs: Annotated[int, typer.Option(help="passes over the training split")] = 3,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    recipe: Recipe = "default",
    learning_rate: LearningRate = None,
    head_learning_rate: HeadLearningRate = None,
    min_steps: MinSteps = None,
    lr_schedule: LrSchedule = None,
    class_weighting: ClassWeighting = None,
    probe_init: ProbeInit = None,
    early_stopping: EarlyStopping = None,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = 16,
    max_length: Annotated[int, typer.Option(help="tokens kept per example")] = 128,
    seed: Annotated[int, typer.Option(help="seed for split, init and order")] = 0,
    max_examples: Annotated[int | None, typer.Option(help="train on a seeded subset")] = None,
    target_module: Annotated[list[str] | None, typer.Option(help="LoRA target (repeat)")] = None,
    stats_rank: Annotated[int, typer.Option(help="covariance rank of the statistics")] = 16,
    no_gates: Annotated[bool, typer.Option("--no-gates", help="skip PHATGOOSE gates")] = False,
    gate_steps: Annotated[int, typer.Option(help="PHATGOOSE gate training steps")] = 100,
    gate_learning_rate: GateLearningRate = None,
    dp_epsilon: DpEpsilon = None,
    dp_delta: DpDelta = 1e-5,
    no_dp: NoDp = False,
    dp_sgd_epsilon: DpSgdEpsilon = None,
    dp_sgd_delta: DpSgdDelta = 1e-5,
    base_model: Annotated[str | None, typer.Option(help="local base model folder")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="do not ask the coordinator")] = False,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Train a LoRA expert on DATA and write its statistics (nothing leaves this machine)."""
    privacy = Privacy(dp_epsilon, dp_delta, no_dp, dp_sgd_epsilon, dp_sgd_delta)
    privacy.statistics()  # contradicting options exit before anything is loaded
    target = Target.resolve(coordinator, token, tls_ca)
    path, info = agreed_base_model(base_model, offline, target)
    config = _train_config(
        path,
        info,
        task_type,
        epochs,
        rank,
        learning_rate,
        batch_size,
        max_length,
        seed,
        max_examples,
        target_module,
        _recipe(
            recipe,
            head_learning_rate,
            min_steps,
            lr_schedule,
            class_weighting,
            probe_init,
            early_stopping,
        ),
    )
    report = _build(
        data,
        out,
        task_name,
        config,
        info,
        description,
        text_field,
        label_field,
        not no_gates,
        gate_steps,
        gate_learning_rate,
        max_length,
        seed,
        privacy,
        stats_rank,
        progress=True,
    )
    print_report(report, json_out)


def stats(
    data: Data,
    adapter: Annotated[Path, typer.Option(help="PEFT LoRA adapter folder (safetensors)")],
    task_name: TaskName,
    description: Annotated[str, typer.Option(help="task description")] = "",
    out: Annotated[
        Path | None, typer.Option(help="write here instead of the adapter folder")
    ] = None,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Annotated[
        str | None, typer.Option(help="head's labels in output order, comma-separated")
    ] = None,
    stats_rank: int = 16,
    no_gates: Annotated[bool, typer.Option("--no-gates")] = False,
    dp_epsilon: DpEpsilon = None,
    dp_delta: DpDelta = 1e-5,
    no_dp: NoDp = False,
    base_model: Annotated[str | None, typer.Option(help="local base model folder")] = None,
    offline: Annotated[bool, typer.Option("--offline")] = False,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Statistics (and gates) for a LoRA adapter trained elsewhere: bring your own adapter."""
    from moerge.contributor_client.build import write_expert_statistics

    dp = Privacy(dp_epsilon, dp_delta, no_dp).statistics()
    target = Target.resolve(coordinator, token, tls_ca)
    path, info = agreed_base_model(base_model, offline, target)
    try:
        report = write_expert_statistics(
            adapter,
            data,
            task_name,
            base_model_path=path,
            label_names=label_names.split(",") if label_names else None,
            task_description=description,
            out_dir=out,
            text_field=text_field,
            label_field=label_field or None,
            with_gates=not no_gates,
            dp=dp,
            no_dp=no_dp,
            statistics_rank=stats_rank,
            base_model_id=info.base_model_id if info else "",
            base_model_revision=info.revision if info else "",
            progress=True,
        )
    except (ValueError, FileNotFoundError) as exc:
        err_console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    print_report(report, json_out)


def contribute(
    data: Data,
    task_name: TaskName,
    name: Annotated[str | None, typer.Option(help="expert name (default: task name)")] = None,
    out: Annotated[Path | None, typer.Option(help="keep the expert folder here")] = None,
    description: str = "",
    text_field: str = "text",
    label_field: str = "label",
    epochs: int = 3,
    rank: int = 8,
    recipe: Recipe = "default",
    learning_rate: LearningRate = None,
    head_learning_rate: HeadLearningRate = None,
    min_steps: MinSteps = None,
    lr_schedule: LrSchedule = None,
    class_weighting: ClassWeighting = None,
    probe_init: ProbeInit = None,
    early_stopping: EarlyStopping = None,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    max_examples: int | None = None,
    stats_rank: int = 16,
    no_gates: Annotated[bool, typer.Option("--no-gates")] = False,
    gate_steps: Annotated[int, typer.Option(help="PHATGOOSE gate training steps")] = 100,
    gate_learning_rate: GateLearningRate = None,
    dp_epsilon: DpEpsilon = None,
    dp_delta: DpDelta = 1e-5,
    no_dp: NoDp = False,
    dp_sgd_epsilon: DpSgdEpsilon = None,
    dp_sgd_delta: DpSgdDelta = 1e-5,
    base_model: str | None = None,
    transport: Transport = TransportChoice.auto,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Train + statistics + upload in one step."""
    import tempfile

    from moerge.contributor_client.upload import TransportUnavailable, upload_expert

    privacy = Privacy(dp_epsilon, dp_delta, no_dp, dp_sgd_epsilon, dp_sgd_delta)
    privacy.statistics()
    target = Target.resolve(coordinator, token, tls_ca)
    path, info = agreed_base_model(base_model, False, target)
    config = _train_config(
        path,
        info,
        None,
        epochs,
        rank,
        learning_rate,
        batch_size,
        max_length,
        seed,
        max_examples,
        None,
        _recipe(
            recipe,
            head_learning_rate,
            min_steps,
            lr_schedule,
            class_weighting,
            probe_init,
            early_stopping,
        ),
    )
    with tempfile.TemporaryDirectory(prefix="moerge-expert-") as tmp:
        folder = out or Path(tmp) / "expert"
        report = _build(
            data,
            folder,
            task_name,
            config,
            info,
            description,
            text_field,
            label_field,
            not no_gates,
            gate_steps,
            gate_learning_rate,
            max_length,
            seed,
            privacy,
            stats_rank,
            progress=True,
        )
        try:
            response = guarded(
                lambda: upload_expert(
                    target,
                    folder,
                    name or task_name,
                    task_name,
                    description,
                    progress=True,
                    transport=transport.value,
                )
            )
        except TransportUnavailable as exc:
            err_console.print(f"[red]error[/red] {exc}")
            raise typer.Exit(1) from None
    if json_out:
        emit_json(
            {
                "expert": response.expert.expert_id,
                "version": response.expert.version,
                "created": response.created,
                "validation_accuracy": report.train.val_accuracy if report.train else None,
                **({} if report.meta.quality is None else quality_rows(report.meta.quality)),
                "warnings": []
                if report.meta.quality is None
                else quality_warnings(report.meta.quality),
                "privacy_report": report.meta.privacy,
            }
        )
        return
    print_report(report, False)
    verb = "registered" if response.created else "already registered"
    typer.echo(
        f"{verb}: expert {response.expert.expert_id} "
        f"({response.expert.name} v{response.expert.version})"
    )
