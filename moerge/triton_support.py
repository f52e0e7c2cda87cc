"""Optional Triton: the import, whether kernels can run here, and falling back when they fail.

Triton kernels serve the GPU paths (:mod:`moerge.coordinator.inference.sgmv_triton`,
:mod:`moerge.router_training.topk_triton`); CPU-only installs have no Triton. A kernel that
fails to build or launch (a Triton or driver it does not suit) is not retried: its path is
marked broken, a warning names the fallback, and the PyTorch path serves from then on.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

try:  # Triton is optional: CPU-only installs do not have it.
    import triton
    import triton.language as tl
    from triton.compiler.errors import CompilationError

    #: what a kernel that cannot be built or launched here raises
    KERNEL_ERRORS: tuple[type[Exception], ...] = (CompilationError, RuntimeError)
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None
    KERNEL_ERRORS = (RuntimeError,)

__all__ = ["KERNEL_ERRORS", "available", "run_or_fall_back", "tl", "triton"]

T = TypeVar("T")


@functools.cache
def available() -> bool:
    """Whether Triton and a CUDA device are present."""
    return triton is not None and torch.cuda.is_available()


def run_or_fall_back(run: Callable[[], T], broken: list[str], what: str, instead: str) -> T | None:
    """``run()``; if the kernel fails to build or launch, record it in ``broken`` (callers then
    skip the kernel for good), warn that ``instead`` is used, and return ``None``."""
    try:
        return run()
    except KERNEL_ERRORS as exc:
        broken.append(repr(exc))
        warnings.warn(
            f"Triton {what} failed ({exc!r}); using {instead} instead", RuntimeWarning, stacklevel=3
        )
        return None
