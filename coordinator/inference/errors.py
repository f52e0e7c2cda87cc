"""Why a prediction request was refused: the engine's refusals, in the platform's one hierarchy.

The caller's mistakes are :mod:`moerge.refusals` exceptions (``InvalidArgument``, ``NotFound``),
so the edges' one status table (:mod:`moerge.coordinator.rpc.status`) answers them like any
other refusal, with the message shown to the caller. They stay ``ValueError``/``LookupError``
too, as the engine's in-process callers (tests, benchmarks, the Python API) catch them. Problems
on the coordinator's side (an expert in the store that does not fit the base model) are not
refusals and become ``INTERNAL``.

=====================  ==================================  ==================================
exception              bases                               raised when
=====================  ==================================  ==================================
``EmptyBatch``         ``InvalidArgument``, ``ValueError``  no input texts
``InputTooLong``       ``InvalidArgument``, ``ValueError``  a text is over the character or
                                                           token limit
``InvalidTopK``        ``InvalidArgument``, ``ValueError``  ``top_k < 1`` or more than the
                                                           experts available
``InvalidPlan``        ``InvalidArgument``, ``ValueError``  a malformed routing plan (shapes,
                                                           weights, method)
``UnknownExpert``      ``NotFound``, ``LookupError``       the expert loader does not know an
                                                           expert id
``IncompatibleExpert`` ``ValueError``                      a stored expert does not fit the
                                                           base model
=====================  ==================================  ==================================
"""

from __future__ import annotations

from moerge.refusals import InvalidArgument, NotFound


class InferenceInputError(InvalidArgument, ValueError):
    """Base of every refused request caused by the caller's input.

    The message says what is wrong and names the value; ``field`` is set where one request
    field is to blame (``InvalidArgument`` would prefix the message with it).
    """

    def __init__(self, message: str, field: str = "") -> None:
        Exception.__init__(self, message)
        self.field = field


class EmptyBatch(InferenceInputError):
    """A request without any input text."""


class InputTooLong(InferenceInputError):
    """An input text over the engine's character or token limit."""


class InvalidTopK(InferenceInputError):
    """``top_k`` outside ``1 .. number of experts``."""


class InvalidPlan(InferenceInputError):
    """A routing plan that cannot be executed (shapes, weights, aggregation method)."""


class UnknownExpert(NotFound, LookupError):
    """An expert id the loader cannot resolve (never registered, or deleted)."""

    def __init__(self, expert_id: str) -> None:
        super().__init__(f"unknown expert {expert_id!r}")
        self.expert_id = expert_id


class IncompatibleExpert(ValueError):
    """A stored expert whose adapter or head does not fit the served base model (not the
    caller's mistake: answered as INTERNAL)."""
