"""Logging set-up: plain lines by default, one JSON object per line with ``--log-json``."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (time, level, logger, message, exception), for log
    collectors."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: int = logging.INFO, json_lines: bool = False) -> None:
    """Send the root logger to stderr, as plain lines or JSON lines, replacing any handler set
    before."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if json_lines:
        _only_json_on_stderr()


def _only_json_on_stderr() -> None:
    """Log shippers expect one JSON object per stderr line, so silence what bypasses ``logging``.

    Progress bars (Hugging Face's "Loading weights" tqdm) go off; Python warnings and the
    transformers logger (which has its own stderr handler) go through the JSON handler instead.
    """
    logging.captureWarnings(True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
