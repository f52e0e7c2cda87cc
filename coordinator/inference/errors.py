"""Why a prediction request was refused, as plain exceptions the servicer maps to gRPC codes.

The caller's mistakes are ``ValueError``/``LookupError`` subclasses with ``grpc_visible = True``:
:func:`moerge.coordinator.rpc.status.status_for` turns those into ``INVALID_ARGUMENT`` with the
message shown to the caller. Problems on the coordinator's side (an expert in the store that does
not fit the base model) are not visible and become ``INTERNAL``.

=====================  ===============  ==================================================
exception              base             raised when
=====================  ===============  ==================================================
``EmptyBatch``         ``ValueError``   no input texts
``InputTooLong``       ``ValueError``   a text is over the character or token limit
``InvalidTopK``        ``ValueError``   ``top_k < 1`` or more than the experts available
``InvalidPlan``        ``ValueError``   a malformed routing plan (shapes, weights, method)
``UnknownExpert``      ``LookupError``  the expert loader does not know an expert id
``IncompatibleExpert`` ``ValueError``   a stored expert does not fit the base model
=====================  ===============  ==================================================
"""

from __future__ import annotations


class InferenceInputError(ValueError):
    """Base of every refused request caused by the caller's input."""

    grpc_visible = True


class EmptyBatch(InferenceInputError):
    """A request without any input text."""


class InputTooLong(InferenceInputError):
    """An input text over the engine's character or token limit."""


class InvalidTopK(InferenceInputError):
    """``top_k`` outside ``1 .. number of experts``."""


class InvalidPlan(InferenceInputError):
    """A routing plan that cannot be executed (shapes, weights, aggregation method)."""


class UnknownExpert(LookupError):
    """An expert id the loader cannot resolve (never registered, or deleted)."""

    grpc_visible = True

    def __init__(self, expert_id: str) -> None:
        super().__init__(f"unknown expert {expert_id!r}")
        self.expert_id = expert_id


class IncompatibleExpert(ValueError):
    """A stored expert whose adapter or head does not fit the served base model."""

    grpc_visible = False
