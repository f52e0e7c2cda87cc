"""How the next token is chosen: sampling parameters, checked once, applied to a whole batch.

Each running request brings its own :class:`SamplingParams`; one decode step samples every
request's next token from its row of logits ``[Q, V]`` in a handful of batched tensor operations
(no per-row Python loop, except for requests with a seed, which draw from their own generator so
that the same seed gives the same text whatever else shares the batch).

The order is the one of HF ``generate``'s logits processors: repetition penalty (CTRL, Keskar
et al., 2019: a seen token's logit is divided by ``r`` when positive, multiplied when negative),
temperature, top-k, top-p (nucleus, Holtzman et al., 2020), then a draw. Temperature 0 is greedy
decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moerge.coordinator.inference.errors import InferenceInputError

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 10.0
MAX_REPETITION_PENALTY = 10.0


class InvalidSampling(InferenceInputError):
    """A sampling parameter outside its documented range."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (ranges in ``protos/moerge/v1/inference.proto``)."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: the scheduler's generator
    stop: tuple[str, ...] = field(default_factory=tuple)
    repetition_penalty: float = 1.0  # 1: off

    def check(self, max_new_tokens_limit: int) -> SamplingParams:
        """Raise :class:`InvalidSampling` naming the first bad field; return self."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidSampling(
                f"max_new_tokens must be in 1..{max_new_tokens_limit}, got {self.max_new_tokens}"
            )
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE or self.temperature != self.temperature:
            raise InvalidSampling(
                f"temperature must be in 0..{MAX_TEMPERATURE:g}, got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSampling(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidSampling(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidSampling(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
                f"got {self.repetition_penalty}"
            )
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidSampling(
                f"at most {MAX_STOP_SEQUENCES} stop strings, got {len(self.stop)}"
            )
        for s in self.stop:
            if not 1 <= len(s) <= MAX_STOP_CHARS:
                raise InvalidSampling(f"stop strings must have 1..{MAX_STOP_CHARS} characters")
        return self

    @property
    def greedy(self) -> bool:
        """Temperature 0 means greedy decoding (argmax, no randomness)."""
        return self.temperature == 0.0


def apply_repetition_penalty(
    logits: torch.Tensor, penalties: torch.Tensor, seen: torch.Tensor
) -> torch.Tensor:
    """``logits`` [Q, V]; ``penalties`` [Q]; ``seen`` [Q, V] bool (token already in the row)."""
    r = penalties.to(logits.dtype).unsqueeze(1)  # [Q, 1]
    penalised = torch.where(logits > 0, logits / r, logits * r)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every logit outside its row's top-k and nucleus (top-p).

    ``logits`` [Q, V]; ``top_k`` [Q] long (0: off); ``top_p`` [Q] (1: off). The most likely
    token always survives.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [Q, V]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)  # [Q, 1]
    drop = ranks >= k
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
    drop |= before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class BatchSampler:
    """Samples the next token of every running request from its logits row."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.seed()

    def new_generator(self, seed: int) -> torch.Generator:
        """A generator on the sampler's device seeded with a request's own seed, so its draws do not
        depend on the other requests."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        seen: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` [Q, V] float -> (tokens [Q] long, log-probabilities [Q] of the raw model).

        ``seen`` [Q, V] bool marks tokens already in each row (needed only when a request sets
        a repetition penalty).
        """
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # [Q, V]
        if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
            tokens = torch.argmax(logits, dim=-1)  # the common case: one kernel
            return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        device = logits.device
        if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
            penalties = torch.tensor([p.repetition_penalty for p in params], device=device)
            logits = apply_repetition_penalty(logits, penalties, seen)
        greedy = torch.tensor([p.greedy for p in params], device=device)  # [Q]
        tokens = torch.argmax(logits, dim=-1)  # [Q]
        if not bool(greedy.all()):
            temperature = torch.tensor(
                [p.temperature if not p.greedy else 1.0 for p in params], device=device
            ).unsqueeze(1)
            top_k = torch.tensor([p.top_k for p in params], device=device, dtype=torch.long)
            top_p = torch.tensor([p.top_p for p in params], device=device)
            probs = torch.softmax(filter_top_k_top_p(logits / temperature, top_k, top_p), -1)
            drawn = self._draw(probs, generators)  # [Q]
            tokens = torch.where(greedy, tokens, drawn)
        return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)

    def _draw(
        self, probs: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> torch.Tensor:
        """One draw per row: shared generator for unseeded rows, their own for seeded ones."""
        drawn = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)  # [Q]
        for row, generator in enumerate(generators):
            if generator is not None:
                drawn[row] = torch.multinomial(probs[row], 1, generator=generator)[0]
        return drawn
