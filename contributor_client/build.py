"""One call per CLI command: turn a data file into a complete expert folder.

``build_expert`` trains a new expert (load -> train -> gates -> statistics);
``write_expert_statistics`` completes an existing PEFT LoRA adapter ("bring your own adapter")
with gates and statistics. Either way the folder ends up holding exactly
:data:`moerge.expert_format.EXPERT_FILES`, ready to upload.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open

from moerge.contributor_client.batching import load_tokenizer
from moerge.contributor_client.data import Examples, label_order, load_examples
from moerge.contributor_client.dp_sgd import DPSGDConfig
from moerge.contributor_client.gates import GateConfig, train_gates
from moerge.contributor_client.privacy import (
    DEFAULT_DELTA,
    DEFAULT_EPSILON,
    DPConfig,
    SGDAccount,
    privacy_report,
)
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.statistics import (
    COVARIANCE_RANK,
    check_release_size,
    compute_statistics,
    save_statistics,
)
from moerge.contributor_client.training import (
    TrainResult,
    load_task_model,
    select_examples,
    train_expert,
)
from moerge.expert_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATISTICS_META,
    ExpertQuality,
    StatisticsMeta,
)

#: PEFT task types of adapters whose loss the gates can be trained with.
PEFT_TASK_TYPES = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}


@dataclass
class BuildReport:
    """What building an expert folder did (nothing here is per-example)."""

    out_dir: Path  # the expert folder, holding expert_format.EXPERT_FILES
    meta: StatisticsMeta  # what statistics.json says
    train: TrainResult | None  # None when the adapter was brought rather than trained here
    gates_skipped: str  # why no gates were trained; "" when they were
    seconds: dict[str, float]  # wall time per phase: "train", "gates", "statistics", "total"
    gates_dp: SGDAccount | str = "none"  # the gates' DP-SGD account, "none" without DP
    # the quality figures (also in meta.quality unless DP-SGD kept them local)
    quality: ExpertQuality | None = None


def build_expert(
    data_path: str | Path,
    out_dir: str | Path,
    task_name: str,
    config: TrainConfig,
    *,
    task_description: str = "",
    text_field: str = "text",
    label_field: str | None = "label",
    gate_config: GateConfig | None = None,
    with_gates: bool = True,
    dp: DPConfig | None = None,
    no_dp: bool = False,
    dp_sgd: DPSGDConfig | None = None,
    statistics_rank: int = COVARIANCE_RANK,
    base_model_revision: str = "",
    progress: bool = True,
) -> BuildReport:
    """Load ``data_path``, train a LoRA expert, train its gates, and write its statistics.

    Gates use ``gate_config`` (default :class:`GateConfig`) unless ``with_gates`` is False.
    Gates and statistics see the examples training saw (all, or ``config.max_examples``).
    ``base_model_revision`` (e.g. the coordinator's) is recorded in ``statistics.json``.
    The statistics are DP with ``dp``, by default :data:`DEFAULT_EPSILON`; ``no_dp`` turns
    that off (recorded). ``dp_sgd`` trains the adapter and the gates with DP-SGD (Opacus).
    ``statistics.json`` gets the privacy report of everything the folder releases.
    """
    started = time.perf_counter()
    dp = statistics_dp(dp, no_dp)
    examples = load_examples(data_path, text_field, label_field)
    texts, labels = select_examples(
        examples.texts, examples.labels, config.max_examples, config.seed
    )
    check_release_size(len(texts), dp)  # before training, not after
    if dp_sgd is not None and with_gates:  # one noise multiplier for adapter and gates
        dp_sgd.gate_steps = (gate_config or GateConfig()).steps
        dp_sgd.gate_examples = len(texts)
    train = train_expert(texts, labels, config, out_dir, progress=progress, dp_sgd=dp_sgd)
    report = _complete_adapter(
        Path(out_dir),
        Path(out_dir),
        Examples(texts, labels, examples.source),
        task_name,
        base_model_path=config.base_model,
        label_names=train.label_names,
        task_description=task_description,
        gate_config=(gate_config or GateConfig()) if with_gates else None,
        dp=dp,
        statistics_rank=statistics_rank,
        base_model_id=config.base_model_id or config.base_model,
        base_model_revision=base_model_revision,
        progress=progress,
        dp_sgd=dp_sgd,
    )
    report.train = train
    report.quality = train.quality()
    # The quality figures are measured on held-out data; under DP-SGD they would be a release
    # without DP, so they stay in the local report only.
    report.meta.quality = None if dp_sgd is not None else report.quality
    report.meta.privacy = privacy_report(
        dp,
        opt_out=no_dp,
        adapter=train.dp_sgd or "none",
        gates=report.gates_dp if report.meta.gate_modules else None,
    )
    if dp_sgd is None:
        report.meta.privacy.not_covered.append(
            "quality (validation accuracy and loss on a held-out split)"
        )
    report.meta.write(Path(out_dir) / STATISTICS_META)
    report.seconds["train"] = train.seconds
    report.seconds["total"] = time.perf_counter() - started
    return report


def write_expert_statistics(
    adapter_dir: str | Path,
    data_path: str | Path,
    task_name: str,
    *,
    base_model_path: str | Path | None = None,
    label_names: list[str] | None = None,
    task_description: str = "",
    out_dir: str | Path | None = None,
    text_field: str = "text",
    label_field: str | None = "label",
    gate_config: GateConfig | None = None,
    with_gates: bool = True,
    dp: DPConfig | None = None,
    no_dp: bool = False,
    statistics_rank: int = COVARIANCE_RANK,
    base_model_id: str = "",
    base_model_revision: str = "",
    progress: bool = True,
) -> BuildReport:
    """Complete an existing PEFT LoRA adapter into an expert folder ("bring your own adapter").

    Statistics are always computed (under the base model, from ``data_path``). Gates are
    trained against the adapter when its loss is known:

    * ``SEQ_CLS`` adapters that carry their head (``modules_to_save``) and labelled data.
      ``label_names`` gives the head's output order; by default it is :func:`label_order` of
      the data's labels, the order :func:`train_expert` uses, and must match the head's size;
    * ``CAUSAL_LM`` adapters (LM loss on the texts).

    Otherwise gates are skipped (``gate_modules=[]``) and ``BuildReport.gates_skipped`` says why.
    ``base_model_path`` defaults to the adapter's ``base_model_name_or_path`` when that is a
    local folder (nothing is downloaded). ``out_dir`` defaults to ``adapter_dir``; another
    folder gets a copy of the adapter files. Only safetensors adapters are read (never pickle).
    ``base_model_id`` defaults to the adapter's ``base_model_name_or_path``.
    """
    started = time.perf_counter()
    dp = statistics_dp(dp, no_dp)
    adapter_dir = Path(adapter_dir)
    examples = load_examples(data_path, text_field, label_field)
    check_release_size(len(examples.texts), dp)
    report = _complete_adapter(
        adapter_dir,
        Path(out_dir) if out_dir is not None else adapter_dir,
        examples,
        task_name,
        base_model_path=base_model_path,
        label_names=label_names,
        task_description=task_description,
        gate_config=(gate_config or GateConfig()) if with_gates else None,
        dp=dp,
        statistics_rank=statistics_rank,
        base_model_id=base_model_id,
        base_model_revision=base_model_revision,
        progress=progress,
    )
    # The adapter was trained elsewhere: moerge cannot say how; its gates are trained here.
    report.meta.privacy = privacy_report(
        dp,
        opt_out=no_dp,
        adapter="external",
        gates="none" if report.meta.gate_modules else None,
    )
    report.meta.write(Path(report.out_dir) / STATISTICS_META)
    report.seconds["total"] = time.perf_counter() - started
    return report


def statistics_dp(dp: DPConfig | None, no_dp: bool) -> DPConfig | None:
    """The statistics' DP: ``dp``, else the default budget, unless the caller opted out."""
    if no_dp:
        if dp is not None:
            raise ValueError("no_dp (--no-dp) and a DP budget (--dp-epsilon) contradict")
        return None
    return dp or DPConfig(epsilon=DEFAULT_EPSILON, delta=DEFAULT_DELTA)


def _complete_adapter(
    adapter_dir: Path,
    out_dir: Path,
    examples: Examples,
    task_name: str,
    *,
    base_model_path: str | Path | None,
    label_names: list[str] | None,
    task_description: str,
    gate_config: GateConfig | None,
    dp: DPConfig | None,
    statistics_rank: int,
    base_model_id: str,
    base_model_revision: str,
    progress: bool,
    dp_sgd: DPSGDConfig | None = None,
) -> BuildReport:
    """Gates (when possible) and statistics for the adapter in ``adapter_dir``."""
    adapter_config = _read_adapter_config(adapter_dir)
    base = _base_model_path(adapter_config, base_model_path)
    peft_task = str(adapter_config.get("task_type") or "")
    task_type = PEFT_TASK_TYPES.get(peft_task) or (
        "classification" if examples.labels is not None else "causal_lm"
    )
    head_size = _head_size(adapter_dir, adapter_config) if peft_task == "SEQ_CLS" else None
    if label_names is None:
        label_names = label_order(examples.labels or []) if task_type == "classification" else []
    if head_size is not None and label_names and len(label_names) != head_size:
        raise ValueError(
            f"{adapter_dir}: the head has {head_size} outputs but there are "
            f"{len(label_names)} label names {label_names}; pass label_names in output order"
        )
    labels = examples.labels if task_type == "classification" and label_names else None

    seconds: dict[str, float] = {}
    gates: dict[str, torch.Tensor] = {}
    skipped = _why_no_gates(peft_task, head_size, labels, gate_config)
    gates_dp: SGDAccount | str = "none"
    if not skipped and gate_config is not None:
        begin = time.perf_counter()
        gates, account = _adapter_gates(
            base,
            adapter_dir,
            task_type,
            label_names,
            examples,
            labels,
            gate_config,
            progress,
            dp_sgd,
        )
        gates_dp = account or "none"
        seconds["gates"] = time.perf_counter() - begin

    begin = time.perf_counter()
    tensors, meta = compute_statistics(
        base,
        examples.texts,
        labels,
        label_names,
        task_name,
        task_description,
        rank=statistics_rank,
        gates=gates,
        dp=dp,
        task_type=task_type,
        base_model_id=base_model_id or adapter_config.get("base_model_name_or_path") or base,
        base_model_revision=base_model_revision,
    )
    save_statistics(out_dir, tensors, meta)
    seconds["statistics"] = time.perf_counter() - begin
    if out_dir.resolve() != adapter_dir.resolve():
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(adapter_dir / name, out_dir / name)
    return BuildReport(
        out_dir=out_dir,
        meta=meta,
        train=None,
        gates_skipped=skipped,
        seconds=seconds,
        gates_dp=gates_dp,
    )


def _why_no_gates(
    peft_task: str | None,
    head_size: int | None,
    labels: list[str] | None,
    gate_config: GateConfig | None,
) -> str:
    if gate_config is None:
        return "gates disabled"
    if peft_task == "CAUSAL_LM":
        return ""
    if peft_task != "SEQ_CLS":
        return f"adapter task_type {peft_task!r}: no task loss to train gates with"
    if head_size is None:
        return "the adapter has no classification head (modules_to_save) to compute a loss"
    if labels is None:
        return "the data has no labels for the classification loss"
    return ""


def _adapter_gates(
    base: str,
    adapter_dir: Path,
    task_type: str,
    label_names: list[str],
    examples: Examples,
    labels: list[str] | None,
    gate_config: GateConfig,
    progress: bool,
    dp_sgd: DPSGDConfig | None = None,
) -> tuple[dict[str, torch.Tensor], SGDAccount | None]:
    tokenizer = load_tokenizer(base)
    with torch.random.fork_rng(devices=[]):
        # The head is replaced by the adapter's; seeding keeps even its throwaway init fixed.
        torch.manual_seed(gate_config.seed)
        base_model = load_task_model(base, task_type, label_names, tokenizer)
    model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    label_ids = None
    if labels is not None:
        index = {name: i for i, name in enumerate(label_names)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not among label_names {label_names}")
        label_ids = [index[label] for label in labels]
    if dp_sgd is not None:
        from moerge.contributor_client.dp_sgd import train_gates_dp

        return train_gates_dp(
            model,
            tokenizer,
            examples.texts,
            label_ids,
            gate_config,
            dp_sgd,
            causal_lm=task_type == "causal_lm",
            progress=progress,
        )
    gates = train_gates(
        model,
        tokenizer,
        examples.texts,
        label_ids,
        gate_config,
        causal_lm=task_type == "causal_lm",
        progress=progress,
    )
    return gates, None


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS}; re-save the adapter with "
            "save_pretrained(..., safe_serialization=True) (pickled weights are never read)"
        )
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    return config


def _base_model_path(adapter_config: dict[str, Any], base_model_path: str | Path | None) -> str:
    if base_model_path is not None:
        return str(base_model_path)
    recorded = adapter_config.get("base_model_name_or_path") or ""
    if recorded and Path(recorded).is_dir():
        return recorded
    raise ValueError(
        f"the adapter's base model {recorded!r} is not a local folder; pass base_model_path "
        "(nothing is downloaded)"
    )


def _head_size(adapter_dir: Path, adapter_config: dict[str, Any]) -> int | None:
    """Outputs of the classification head saved with the adapter, None when there is none."""
    heads = adapter_config.get("modules_to_save") or []
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if any(key.endswith(f".{head}.weight") for head in heads):
                return int(handle.get_slice(key).get_shape()[0])
    return None
