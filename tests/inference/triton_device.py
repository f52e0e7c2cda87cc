"""Where a Triton kernel can be tested: CUDA, or the CPU under Triton's interpreter.

Kernel tests run on a GPU; with ``TRITON_INTERPRET=1`` (and Triton installed) they also run on
the CPU, which is how kernels are checked on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

from moerge.triton_support import triton


def triton_device() -> str | None:
    """``"cuda"``, ``"cpu"`` under the interpreter, or None where Triton cannot run."""
    if triton is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None
