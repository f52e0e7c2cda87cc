"""Several decode steps per host round trip (multi-step decoding).

A decode step of the running batch is a few milliseconds of GPU work once it is a CUDA graph
(:mod:`.cuda_graphs`), but the host work around it — reading the sampled tokens back, streaming
text deltas to every client, the event loop's writes — is paid once per step and grows with the
number of streams. When the next step's input depends only on this step's logits and on noise
drawn in advance, the device can run ``K`` steps back to back without the host: after each step
the chosen token becomes the next input and every row's position moves one column (vLLM's
*multi-step scheduling* does the same). The host then reads ``K`` tokens per row at once and pays
its per-step work once per ``K`` tokens.

Which batches qualify: greedy rows choose ``argmax``; sampling rows (temperature, top-k, top-p,
no seed) choose by the Gumbel-max trick, ``argmax(filtered / T + G)`` with ``G = -log(-log U)``
and ``U`` uniform noise drawn for the whole chunk before it starts, which is an exact draw from
``softmax(filtered / T)`` (:func:`~.sampling.filter_top_k_top_p` keeps :class:`~.sampling.
BatchSampler`'s order: temperature, top-k, top-p). Requests with a seed (their own generator),
a repetition penalty (the tokens seen so far) or an output ensemble (a mixture over several
rows) need the host between steps, so a batch holding any of them decodes one step at a time.

What it costs: a request that finishes (EOS, a stop string, its token budget) inside a chunk
decoded up to ``K - 1`` tokens nobody reads, text reaches clients ``K`` tokens at a time, and a
request that arrives waits for the running chunk before it joins. ``K`` stays fixed even when
every request needs fewer tokens: each (rows bucket, ``K``) pair is a graph to capture (about a
quarter of a second for a 1.1B model), and shrinking ``K`` as a batch drains multiplied the
shapes; measured on an H100, captures inside a burst of 32 requests pushed their time to first
token to 1.4 s.

Tensors (``R``: rows of the step, ``K``: steps of the chunk, ``V``: vocabulary)::

    input_ids   [R, 1] long     the rows' last tokens; overwritten with each step's choice
    positions   [R_max] long    each row's next column (KVRows); moved one column per step
    noise       [K, R, V]       uniform noise of the sampling rows (sampled chunks only)
    tokens      [K, R] long     the chosen token of every row at every step
    logprobs    [K, R] float32  its log-probability under the model, log softmax(logits)[token]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from moerge.coordinator.inference.generation.kv_rows import KVRows
from moerge.coordinator.inference.generation.sampling import SamplingParams, filter_top_k_top_p


def chunk_mode(params: Sequence[SamplingParams], ensembles: bool) -> str | None:
    """How a batch of requests with ``params`` can decode several steps per host trip:
    ``"greedy"`` (every row greedy), ``"sampled"`` (some rows sample without a seed) or
    ``None`` (it needs the host between steps)."""
    if ensembles or any(p.repetition_penalty != 1.0 for p in params):
        return None
    if all(p.greedy for p in params):
        return "greedy"
    if any(p.seed is not None and not p.greedy for p in params):
        return None
    return "sampled"


class RowSampling:
    """The sampling settings of a chunk's rows as device tensors, written before each chunk."""

    def __init__(self, steps: int, rows: int, vocab: int, device: torch.device) -> None:
        self.temperature = torch.ones(rows, device=device)  # [R] (1 for greedy rows)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)  # [R] (0: off)
        self.top_p = torch.ones(rows, device=device)  # [R] (1: off)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=device)  # [R]
        self.noise = torch.empty(steps, rows, vocab, device=device)  # [K, R, V] in (0, 1)

    def fill(
        self, params: Sequence[SamplingParams | None], generator: torch.Generator | None
    ) -> None:
        """Row ``r`` samples with ``params[r]`` (``None``: a row no request uses, greedy);
        fresh noise for the whole chunk from ``generator``."""
        device = self.temperature.device
        greedy = [p is None or p.greedy for p in params]
        self.greedy.copy_(torch.tensor(greedy, device=device))
        self.temperature.copy_(
            torch.tensor([1.0 if p is None or p.greedy else p.temperature for p in params])
        )
        self.top_k.copy_(torch.tensor([0 if p is None else p.top_k for p in params]))
        self.top_p.copy_(torch.tensor([1.0 if p is None else p.top_p for p in params]))
        self.noise.uniform_(1e-10, 1.0, generator=generator)

    def choose(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        """Each row's token at ``step`` from ``logits`` [R, V] float (graph-safe)."""
        scaled = logits / self.temperature[:, None]
        filtered = filter_top_k_top_p(scaled, self.top_k, self.top_p)
        gumbel = -torch.log(-torch.log(self.noise[step]))  # [R, V]
        drawn = (filtered + gumbel).argmax(dim=-1)
        return torch.where(self.greedy, logits.argmax(dim=-1), drawn)


def decode_chunk(
    forward: Callable[[], torch.Tensor],
    input_ids: torch.Tensor,
    kv: KVRows,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
    sampling: RowSampling | None = None,
) -> None:
    """Run ``tokens.shape[0]`` steps of ``forward`` (which reads ``input_ids`` and the rows'
    positions and returns logits [R, V]) with no read-back, so a CUDA graph can hold it; rows
    choose greedily, or as ``sampling`` says.

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
        token = logits.argmax(dim=-1) if sampling is None else sampling.choose(step, logits)
        tokens[step] = token
        logprobs[step] = logits.gather(1, token[:, None])[:, 0] - logits.logsumexp(dim=-1)
        input_ids.copy_(token[:, None])
