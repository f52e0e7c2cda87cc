"""What the CLI shows about an expert beyond its registry fields: quality and privacy.

``moerge train``, ``stats`` and ``contribute`` print the expert they wrote with
:func:`print_report`; ``moerge admin experts show`` prints an uploaded expert's quality
(:func:`quality_table`, the figures ``train`` recorded) and privacy report with the same
functions. Quality is the expert's validation figures beside
its baselines (``ExpertQuality`` of :mod:`moerge.expert_format`): the linear probe's and the
majority class's accuracy, or the base model's validation loss, with a warning wherever the
expert does not beat them.
"""

from __future__ import annotations

from typing import Any

from moerge.cli.output import emit_json, err_console, table


def quality_rows(quality: object) -> dict[str, object]:
    """The expert's validation figures beside its baselines (see ``ExpertQuality``)."""
    names = (
        "validation_accuracy",
        "probe_accuracy",
        "majority_accuracy",
        "validation_loss",
        "base_validation_loss",
    )
    values = {name: getattr(quality, name) for name in names}
    return {
        ("linear_probe_accuracy" if k == "probe_accuracy" else k): round(v, 4)
        for k, v in values.items()
        if v is not None
    }


def quality_warnings(quality: object) -> list[str]:
    """Why the expert may not be worth routing to (empty when it beats its baselines)."""
    accuracy = getattr(quality, "validation_accuracy", None)
    warnings = []
    for name, label in (
        ("majority_accuracy", "the majority class"),
        ("probe_accuracy", "a linear probe on the base model"),
    ):
        floor = getattr(quality, name, None)
        if accuracy is not None and floor is not None and accuracy <= floor:
            warnings.append(
                f"validation accuracy {accuracy:.3f} does not beat {label} ({floor:.3f})"
            )
    loss, base_loss = (
        getattr(quality, n, None) for n in ("validation_loss", "base_validation_loss")
    )
    if loss is not None and base_loss is not None and loss >= base_loss:
        warnings.append(
            f"validation loss {loss:.3f} is not below the base model's ({base_loss:.3f})"
        )
    return warnings


def quality_table(quality: object) -> None:
    """An uploaded expert's recorded quality as a table (``admin experts show``), with the
    warnings ``train`` gave its contributor on stderr."""
    examples = getattr(quality, "validation_examples", 0)
    table(
        f"quality ({examples} validation examples)",
        ("figure", "value"),
        list(quality_rows(quality).items()),
    )
    for warning in quality_warnings(quality):
        err_console.print(f"[yellow]warning[/yellow] {warning}")


def print_report(report: object, json_out: bool) -> None:
    """What ``train``, ``stats`` and ``contribute`` say about the expert folder they wrote:
    its summary, its quality against its baselines (warnings on stderr) and its privacy."""
    meta = report.meta  # type: ignore[attr-defined]
    train = report.train  # type: ignore[attr-defined]
    quality = getattr(meta, "quality", None)
    summary = {
        "expert_dir": str(report.out_dir),  # type: ignore[attr-defined]
        "task": meta.task_name,
        "examples": meta.example_count,
        "labels": meta.label_names,
        "validation_accuracy": None if train is None else train.val_accuracy,
        "validation_examples": None if train is None else train.val_count,
        **({} if quality is None else quality_rows(quality)),
        "gates": len(meta.gate_modules),
        "gates_skipped": report.gates_skipped,  # type: ignore[attr-defined]
        "dp": None if meta.dp is None else {"epsilon": meta.dp.epsilon, "delta": meta.dp.delta},
        "seconds": {k: round(v, 2) for k, v in report.seconds.items()},  # type: ignore[attr-defined]
    }
    warnings = [] if quality is None else quality_warnings(quality)
    if meta.privacy is not None and meta.privacy.statistics_opt_out:
        warnings.append("the statistics are released WITHOUT differential privacy (--no-dp)")
    if json_out:
        emit_json({**summary, "privacy_report": meta.privacy, "warnings": warnings})
        return
    table("expert", ("field", "value"), [(k, v) for k, v in summary.items()])
    if meta.privacy is not None:
        privacy_table(meta.privacy)
    for warning in warnings:
        err_console.print(f"[yellow]warning[/yellow] {warning}")


def privacy_rows(report: Any) -> list[tuple[object, ...]]:
    """One row per release of a :class:`~moerge.expert_format.PrivacyReport`, then the total."""
    rows: list[tuple[object, ...]] = []
    for r in report.releases:
        budget = ("-", "-") if r.epsilon is None else (f"{r.epsilon:.3g}", f"{r.delta:.2g}")
        rows.append((r.what, r.mechanism, *budget))
    if report.epsilon is not None:
        scope = "all together" if report.all_dp else "DP releases together"
        accountant = getattr(report, "accountant", "dp_accounting PLD")
        rows.append((scope, accountant, f"{report.epsilon:.3g}", f"{report.delta:.2g}"))
    if not report.all_dp:
        rows.append(("everything released", "not DP", "-", "-"))
    return rows


def privacy_table(report: Any) -> None:
    """The privacy report as a table (what was released, mechanism, epsilon, delta)."""
    table(
        f"privacy (per {report.unit})",
        ("released", "mechanism", "epsilon", "delta"),
        privacy_rows(report),
    )
    if report.statistics_opt_out:
        err_console.print("[yellow]warning[/yellow] DP on the statistics was turned off (--no-dp)")
