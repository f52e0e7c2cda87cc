"""Write the small example data sets the compose contributors train on (``examples/data``).

Why a script: the files are real examples cut from the offline data sets of
:mod:`moerge.datasets`, and this shows (and repeats) how they were made.
Run from the repository root after ``make data``: ``python examples/make_data.py``.
"""

from __future__ import annotations

from pathlib import Path

from moerge.datasets import load_task, write_jsonl

#: contributor name -> (task, training examples kept)
EXAMPLES: dict[str, tuple[str, int]] = {
    "alice": ("rotten_tomatoes", 40),
    "bob": ("bbc_news", 40),
}
MAX_CHARS = 400  # keep lines short: the files are for a quick demonstration, not for accuracy


def main(out_dir: Path = Path(__file__).resolve().parent / "data") -> None:
    """Write the example JSONL files: a few demo tasks' training examples, texts cut to
    ``MAX_CHARS``."""
    for name, (task, count) in EXAMPLES.items():
        data = load_task(task, max_train=count, max_test=None, seed=0)
        examples = [type(e)(text=e.text[:MAX_CHARS], label=e.label) for e in data.train]
        path = write_jsonl(examples, out_dir / f"{name}.jsonl")
        print(f"{path}: {len(examples)} examples of {task} ({', '.join(data.label_names)})")


if __name__ == "__main__":
    main()
