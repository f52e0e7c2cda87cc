"""The requests of the two streamed calls, ``Generate`` and ``Compose``.

:class:`moerge.Client` and :class:`moerge.AsyncClient` stream each its own way (an iterator,
an async iterator), so unlike the unary calls of :mod:`moerge.calls` only the request is
written once: these functions turn a method's keyword arguments into the protobuf request,
checked the same way for both clients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moerge.calls import aggregation_number
from moerge.errors import MoergeError
from moerge.v1 import inference_pb2


def generate_request(
    prompt: str | None = None,
    *,
    messages: Iterable[dict[str, str]] | None = None,
    max_new_tokens: int = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    sample_top_k: int = 0,
    seed: int | None = None,
    stop: Iterable[str] = (),
    repetition_penalty: float | None = None,
    top_k: int = 0,
    method: str = "",
    experts: Iterable[str] = (),
    aggregation: str = "default",
    router_version: int = 0,
    composition: str = "",
    composition_version: int = 0,
) -> inference_pb2.GenerateRequest:
    """The ``Generate`` request for Client.generate`'s arguments.

    A plain ``prompt`` or chat ``messages`` (``{"role": ..., "content": ...}``), not both.
    Sampling: ``max_new_tokens`` (0: the coordinator's default), ``temperature`` (unset:
    greedy), ``top_p``, ``sample_top_k`` (0: off), ``seed``, ``stop`` strings,
    ``repetition_penalty``; unset values take the coordinator's defaults. Routing: ``top_k``
    experts, ``method``, ``experts``, ``aggregation`` and ``router_version`` as in
    Client.predict`; or ``composition`` (and ``composition_version``) to serve a stored
    few-shot composition instead of routing.
    """
    if (prompt is None) == (messages is None):
        raise MoergeError.invalid("pass exactly one of prompt and messages")
    optional: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "seed": seed}
    optional["repetition_penalty"] = repetition_penalty
    sampling = inference_pb2.SamplingParams(
        max_new_tokens=max_new_tokens,
        top_k=sample_top_k,
        stop=list(stop),
        **{k: v for k, v in optional.items() if v is not None},
    )
    return inference_pb2.GenerateRequest(
        prompt=prompt or "",
        messages=[inference_pb2.ChatMessage(**m) for m in messages or ()],
        sampling=sampling,
        top_k=top_k,
        routing_method=method,
        expert_ids=list(experts),
        aggregation=aggregation_number(aggregation),
        router_version=router_version,
        composition=composition,
        composition_version=composition_version,
    )


def compose_request(
    name: str,
    examples: Iterable[tuple[str, str]],
    *,
    experts: Iterable[str] = (),
    budget: int = 0,
    time_limit_s: float = 0.0,
    l1: float | None = None,
    seed: int = 0,
    keep_examples: bool = False,
) -> inference_pb2.ComposeRequest:
    """The ``Compose`` request for :meth:`Client.compose`'s arguments.

    ``examples``: (text, label) pairs of the new task (1..100); ``experts``: candidate expert
    ids (empty: every active expert whose labels cover the examples'); ``budget`` loss
    evaluations (0: 40), ``time_limit_s`` (0: 120 s), ``l1`` penalty (unset: 0.05), ``seed``;
    ``keep_examples`` stores the examples with the composition (default: dropped).
    """
    return inference_pb2.ComposeRequest(
        name=name,
        examples=[inference_pb2.LabelledExample(text=t, label=y) for t, y in examples],
        expert_ids=list(experts),
        budget=budget,
        time_limit_s=time_limit_s,
        seed=seed,
        keep_examples=keep_examples,
        **({} if l1 is None else {"l1": l1}),
    )
