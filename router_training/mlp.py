"""A small MLP (or linear softmax) classifier over experts, trained on sampled embeddings.

No raw data exists at the coordinator, so the classifier is trained on a stream of synthetic
embeddings drawn from the experts' uploaded Gaussians (see :mod:`moerge.router_training.gaussian`)
-- the "generative replay" view of statistics-based routing. Each step draws a class-balanced
batch (``batch_size / 8`` experts, 8 draws from each)::

    e_i ~ Uniform{1..E},   x_i ~ N(mu_{e_i}, U_{e_i} U_{e_i}^T + diag(D_{e_i}))
    (optionally x_i <- x_i / ||x_i||, as inference embeddings are L2-normalised)

and takes an AdamW step (cosine-decayed learning rate) on the cross-entropy of ``f(x_i)``
against ``e_i``. The classifier is a residual on top of LDA (``lda_skip=True``)::

    f(x) = W_lda (x - c) + b_lda  +  g_theta( (x - c) / s )

where the fixed linear skip is the LDA discriminant with uniform priors
(:mod:`moerge.router_training.lda`: ``W_lda = (Sigma_w^{-1} (mu_e - c))_e``), ``g_theta`` is
``Linear -> GELU -> ... -> Linear(E)`` with its last layer initialised to zero, and ``c`` / ``s``
are the per-dimension mean / standard deviation of the uniform mixture (exact, from the
statistics). Training therefore starts from LDA's accuracy and only learns what a shared
covariance cannot express (e.g. experts' different covariances); a from-scratch MLP needs
orders of magnitude more steps to separate a thousand experts whose means differ by a few
percent, and keeping the skip fixed saves a third of every step.
With ``lda_skip=False`` it is a plain MLP (``hidden_sizes=[]``: linear softmax) on ``(x - c) / s``.
Fresh samples every step mean there is no fixed training set to overfit.

A class-balanced classifier estimates ``log p(x | e)`` up to a per-row constant, so the priors
enter by logit adjustment (Menon et al., 2021, "Long-tail learning via logit adjustment")::

    logit_e(x) = f(x)_e + log pi_e

and the routing weights are ``softmax(topk(logit) / T)`` with ``T`` fitted on held-out draws
(``calibrate=True``), as for the other statistics routers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moerge.router_training.base import RouterConfig
from moerge.router_training.gaussian import (
    GaussianBank,
    GaussianRouter,
    GaussianRouterConfig,
    as_float_batch,
)
from moerge.router_training.lda import pooled_covariance_solve
from moerge.router_training.methods import register_router

#: Each step draws ``batch_size / 8`` experts uniformly and 8 samples from each.
_DRAWS_PER_EXPERT = 8


@dataclass
class MLPRouterConfig(GaussianRouterConfig):
    """MLP router trained on samples from the experts' Gaussians."""

    hidden_sizes: list[int] = field(default_factory=lambda: [256])  # [] + no skip: linear softmax
    steps: int = 200  # optimiser steps, each on a fresh batch of samples
    batch_size: int = 512  # samples per step (8 from each of batch_size/8 experts)
    learning_rate: float = 3e-3  # peak AdamW learning rate, cosine-decayed to 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    normalize_samples: bool = True  # L2-normalise samples like the inference embeddings
    lda_skip: bool = True  # add the (fixed) LDA discriminant as a linear skip

    def validate(self) -> None:
        """Refuse out-of-range settings with a ``ValueError`` naming the field (configs come from
        JSON and the CLI)."""
        super().validate()
        if not isinstance(self.hidden_sizes, (list, tuple)) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in self.hidden_sizes
        ):
            raise ValueError(f"hidden_sizes must be a list of ints >= 1, got {self.hidden_sizes!r}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("normalize_samples", "lda_skip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


def build_network(hidden_size: int, hidden_sizes: list[int], num_experts: int) -> nn.Sequential:
    """``Linear -> GELU -> ... -> Linear(num_experts)``."""
    layers: list[nn.Module] = []
    width = hidden_size
    for h in hidden_sizes:
        layers += [nn.Linear(width, h), nn.GELU()]
        width = h
    layers.append(nn.Linear(width, num_experts))
    return nn.Sequential(*layers)


class ResidualClassifier(nn.Module):
    """``skip(x - c) + body((x - c) / s)``; either part may be absent (see the module doc)."""

    def __init__(
        self, hidden_size: int, hidden_sizes: list[int], num_experts: int, skip: bool
    ) -> None:
        super().__init__()
        self.skip = nn.Linear(hidden_size, num_experts) if skip else None
        has_body = bool(hidden_sizes) or not skip
        self.body = build_network(hidden_size, hidden_sizes, num_experts) if has_body else None
        if self.skip is not None and self.body is not None:
            last = self.body[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, centred: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Logits of centred embeddings: the linear skip (LDA's start) plus the MLP body's residual
        on the scaled input."""
        out = self.skip(centred) if self.skip is not None else None
        if self.body is not None:
            residual = self.body(centred * scale)
            out = residual if out is None else out + residual
        assert out is not None
        return out


@register_router
class MLPRouter(GaussianRouter):
    """Classifier over experts trained on draws from their Gaussians (example-level)."""

    method: ClassVar[str] = "mlp"
    config_class: ClassVar[type[RouterConfig]] = MLPRouterConfig
    config: MLPRouterConfig

    network: ResidualClassifier
    input_mean: torch.Tensor
    input_scale: torch.Tensor

    def _draw(
        self, bank: GaussianBank, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        groups = max(1, n // _DRAWS_PER_EXPERT)
        experts = torch.randint(bank.num_experts, (groups,), generator=generator)
        x, labels = bank.sample_grouped(experts, _DRAWS_PER_EXPERT, generator)
        return self.prepare_samples(x), labels

    def prepare_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Normalise the drawn training samples when the config says so, as real embeddings are."""
        return F.normalize(samples, dim=-1) if self.config.normalize_samples else samples

    def _fit_bank(self, bank: GaussianBank, generator: torch.Generator) -> None:
        cfg = self.config
        uniform = torch.full((bank.num_experts,), 1.0 / bank.num_experts, dtype=torch.float64)
        mean, var = bank.mixture_moments(uniform)
        self.input_mean = mean
        self.input_scale = 1.0 / var.clamp_min(1e-12).sqrt()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.network = ResidualClassifier(
                bank.hidden_size, list(cfg.hidden_sizes), bank.num_experts, cfg.lda_skip
            )
        if self.network.skip is not None:
            offsets = (bank.means.to(torch.float64) - mean.to(torch.float64)).T  # [H, E]
            weight = pooled_covariance_solve(bank, offsets, shrinkage=0.0, solver="auto")
            with torch.no_grad():
                self.network.skip.weight.copy_(weight.T)
                self.network.skip.bias.copy_(-0.5 * (offsets * weight).sum(0))
            self.network.skip.requires_grad_(False)
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        if not trainable:  # lda_skip with no hidden layers: the LDA discriminant itself
            self.network.eval()
            return
        optimizer = torch.optim.AdamW(
            trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.network.train()
        with torch.enable_grad():
            for step in range(cfg.steps):
                lr = cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = self._draw(bank, cfg.batch_size, generator)
                loss = F.cross_entropy(self.network(x - self.input_mean, self.input_scale), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.network.eval()
        self.network.requires_grad_(False)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The classifier's logits plus the experts' log-priors, without gradients."""
        x = as_float_batch(embeddings, self.input_mean.shape[0])
        with torch.no_grad():
            return self.network(x - self.input_mean, self.input_scale) + self.log_priors

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base state, the input normalisation and the network's parameters under
        ``network.``."""
        state = {
            **self._base_state(),
            "input_mean": self.input_mean,
            "input_scale": self.input_scale,
        }
        state.update({f"network.{k}": v for k, v in self.network.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`: the network is rebuilt from the config, then loaded."""
        self._load_base_state(state)
        self.input_mean = state["input_mean"]
        self.input_scale = state["input_scale"]
        self.network = ResidualClassifier(
            int(self.input_mean.shape[0]),
            list(self.config.hidden_sizes),
            self.num_experts,
            self.config.lda_skip,
        )
        prefix = "network."
        self.network.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        self.network.eval()
        self.network.requires_grad_(False)
