"""``serve --check``: validate settings, reach the database, read the base model; then exit."""

from __future__ import annotations

from moerge.coordinator.config import CoordinatorConfig
from moerge.coordinator.uploads.base_model import describe_base_model
from moerge.storage.db import current_revision, make_engine


def run_checks(config: CoordinatorConfig) -> bool:
    """Print one line per check; True when all pass. Changes nothing on disk or in the DB."""
    ok = True

    def report(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and passed
        print(f"[{'ok' if passed else 'FAIL'}] {name}: {detail}")

    try:
        engine = make_engine(config.database_url)
        with engine.connect():
            pass
        revision = current_revision(engine)
        report(
            "database", True, f"reachable, schema revision {revision or 'none (migrates on start)'}"
        )
        engine.dispose()
    except Exception as exc:  # any driver error is a failed check, reported not raised
        report("database", False, f"{type(exc).__name__}: {exc}")
    try:
        spec = describe_base_model(
            config.base_model,
            config.base_model_id,
            config.task_type,
            tuple(config.target_modules),
            config.max_lora_rank,
        )
        report(
            "base model",
            True,
            f"{spec.model_id} hidden={spec.hidden_size} "
            f"targets={len(spec.target_shapes())} revision={spec.revision[:12]}",
        )
    except Exception as exc:
        report("base model", False, f"{type(exc).__name__}: {exc}")
    try:
        from moerge.coordinator.inference.device import resolve_placement

        described = resolve_placement(config.device, config.dtype).description
        if config.predict_process:
            described += "; Predict's model in a process of its own (predict_process)"
        report("inference device", True, described)
    except Exception as exc:
        report("inference device", False, f"{type(exc).__name__}: {exc}")
    for name in ("tls_cert", "tls_key"):
        path = getattr(config, name)
        if path:
            from pathlib import Path

            report(name, Path(path).is_file(), path)
    return ok
