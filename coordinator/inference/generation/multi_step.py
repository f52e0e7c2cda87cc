"""Several greedy decode steps per host round trip (multi-step decoding).

A decode step of the running batch is a few milliseconds of GPU work once it is a CUDA graph
(:mod:`.cuda_graphs`), but the host work around it — reading the sampled tokens back, streaming
text deltas to every client, the event loop's writes — is paid once per step and grows with the
number of streams. When every running request decodes greedily, the next step's input is a pure
function of this step's logits, so the device can run ``K`` steps back to back without the host:
after each step ``argmax`` becomes the next input token and every row's position moves one
column (vLLM's *multi-step scheduling* does the same). The host then reads ``K`` tokens per row
at once and pays its per-step work once per ``K`` tokens.

What it costs: a request that finishes (EOS, a stop string, its token budget) inside a chunk
decoded up to ``K - 1`` tokens nobody reads, text reaches clients ``K`` tokens at a time, and a
request that arrives waits for the running chunk before it joins. Requests that sample,
penalise repetition or ensemble outputs over several rows need the host between steps
(:class:`~.sampling.BatchSampler`), so a batch holding any of them decodes one step at a time.

Tensors (``R``: rows of the step, ``K``: steps of the chunk)::

    input_ids   [R, 1] long     the rows' last tokens; overwritten with each step's choice
    positions   [R_max] long    each row's next column (KVRows); moved one column per step
    tokens      [K, R] long     the greedy token of every row at every step
    logprobs    [K, R] float32  its log-probability under the model, log softmax(logits)[token]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from moerge.coordinator.inference.generation.kv_rows import KVRows
from moerge.coordinator.inference.generation.sampling import SamplingParams


def decodes_greedily(params: Sequence[SamplingParams], ensembles: bool) -> bool:
    """Whether a batch of requests with ``params`` can decode several steps per host trip."""
    return not ensembles and all(p.greedy and p.repetition_penalty == 1.0 for p in params)


def chunk_steps(limit: int, remaining: int) -> int:
    """Steps of the next chunk: the smallest power of two covering ``remaining`` tokens (the
    most any running request still needs), at most ``limit`` (fewer shapes to capture)."""
    steps = 1
    while steps < min(limit, remaining):
        steps *= 2
    return min(steps, max(limit, 1))


def greedy_chunk(
    forward: Callable[[], torch.Tensor],
    input_ids: torch.Tensor,
    kv: KVRows,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
) -> None:
    """Run ``tokens.shape[0]`` greedy steps of ``forward`` (which reads ``input_ids`` and the
    rows' positions and returns logits [R, V]) with no read-back, so a CUDA graph can hold it.

    A row that passes the end of its KV buffer (it finished inside the chunk) writes its last
    column again instead of past it; nobody reads that row's later tokens.
    """
    assert kv.positions is not None
    rows = input_ids.shape[0]
    last = kv.capacity - 1
    for step in range(tokens.shape[0]):
        if step:
            kv.positions[:rows].add_(1).clamp_(max=last)
        logits = forward().float()  # [R, V]
        token = logits.argmax(dim=-1)  # [R]
        tokens[step] = token
        logprobs[step] = logits.gather(1, token[:, None])[:, 0] - logits.logsumexp(dim=-1)
        input_ids.copy_(token[:, None])
