"""moerge: model MoErging platform.

``moerge.Client``, ``moerge.AsyncClient`` and ``moerge.MoergeError`` are imported on first
access (PEP 562), so that ``import moerge`` -- and with it the ``moerge`` command -- stays light:
the client pulls in grpc, and its training methods torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Client": "moerge.client",
    "AsyncClient": "moerge.client",
    "MoergeError": "moerge.errors",
    "TrainOptions": "moerge.client_training",
}
__all__ = ["AsyncClient", "Client", "MoergeError", "TrainOptions", "__version__"]

if TYPE_CHECKING:
    from moerge.client import AsyncClient, Client
    from moerge.client_training import TrainOptions
    from moerge.errors import MoergeError


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'moerge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
