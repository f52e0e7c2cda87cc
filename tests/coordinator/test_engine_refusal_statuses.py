"""The engine's input errors are refusals of the one hierarchy: the edge's table answers them."""

from __future__ import annotations

import grpc
import pytest

from moerge import refusals
from moerge.coordinator.inference.errors import (
    EmptyBatch,
    IncompatibleExpert,
    InputTooLong,
    InvalidPlan,
    InvalidTopK,
    UnknownExpert,
)
from moerge.coordinator.inference.generation.sampling import InvalidSampling
from moerge.coordinator.rpc.status import status_for


@pytest.mark.parametrize(
    "error", [EmptyBatch, InputTooLong, InvalidTopK, InvalidPlan, InvalidSampling]
)
def test_the_callers_input_errors_are_invalid_argument_with_their_message(error):
    exc = error("top_k must be in 1..4, got 9")
    assert isinstance(exc, refusals.InvalidArgument) and isinstance(exc, ValueError)
    assert status_for(exc) == (grpc.StatusCode.INVALID_ARGUMENT, "top_k must be in 1..4, got 9")


def test_an_unknown_expert_is_not_found_and_still_a_lookup_error():
    exc = UnknownExpert("e-123")
    assert isinstance(exc, refusals.NotFound) and isinstance(exc, LookupError)
    assert status_for(exc) == (grpc.StatusCode.NOT_FOUND, "unknown expert 'e-123'")


def test_an_expert_that_does_not_fit_the_base_model_is_internal_without_details():
    code, message = status_for(IncompatibleExpert("lora_A of q_proj is [8, 64], expected [8, 32]"))
    assert code is grpc.StatusCode.INTERNAL and "q_proj" not in message
