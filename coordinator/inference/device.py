"""Where and in which precision the coordinator's inference runs: one resolution, logged once.

``device``: ``auto`` (the first CUDA device when torch sees one, else the CPU), ``cpu``, ``cuda``
or ``cuda:N``. ``dtype``: ``auto`` (bfloat16 on a CUDA device that supports it, float16 on one
that does not, float32 on the CPU), ``float32``, ``bfloat16`` or ``float16``. Half precision on
the CPU is allowed (it is slow there) but never chosen by ``auto``. Asking for CUDA on a machine
without it is an error at start, not a silent fall-back to the CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_CUDA_N = re.compile(r"^cuda:\d+$")


def check_device_settings(device: str, dtype: str) -> None:
    """Syntax only (no torch import): raise ValueError naming the setting."""
    if device not in DEVICES and not _CUDA_N.match(device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


@dataclass(frozen=True)
class Placement:
    """The resolved device and dtype, and a line that says why."""

    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float32", "bfloat16", "float16"
    description: str  # e.g. "cuda:0 (NVIDIA H100 80GB HBM3), bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` named by ``dtype`` (torch imported only when asked)."""
        import torch

        return getattr(torch, self.dtype)


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """Resolve ``auto`` settings against this machine; raise ValueError if CUDA is missing."""
    import torch

    check_device_settings(device, dtype)
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for but torch sees no CUDA device")
        index = int(device.split(":")[1])
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} was asked for but torch sees {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
        name = torch.cuda.get_device_name(index)
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return Placement(device, dtype, f"{device} ({name}), {dtype}")
    if dtype == "auto":
        dtype = "float32"
    return Placement("cpu", dtype, f"cpu ({torch.get_num_threads()} threads), {dtype}")
