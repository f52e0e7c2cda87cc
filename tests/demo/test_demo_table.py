"""The demo's table: every method beside the oracle, and the majority-class floor."""

from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console

from moerge import demo


def test_the_demo_table_shows_the_majority_floor_as_a_share_of_the_oracle(monkeypatch):
    console = Console(record=True, width=120)
    monkeypatch.setattr(demo, "console", console)
    scores = [
        SimpleNamespace(
            method="oracle", error="", routing_accuracy=1.0, task_accuracy=0.5, seconds=1.0
        ),
        SimpleNamespace(
            method="lda", error="", routing_accuracy=0.9, task_accuracy=0.45, seconds=2.0
        ),
    ]
    demo._print_table(scores, {"lda": 0.25}, 200, ["a", "b"], floor=0.34)
    text = console.export_text()
    floor_row = next(line for line in text.splitlines() if "majority floor" in line)
    assert "34.0%" in floor_row and "68.0%" in floor_row  # 0.34 / 0.50 of the oracle
    assert "90.0%" in text and "0.25" in text
