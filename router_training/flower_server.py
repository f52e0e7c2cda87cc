"""The coordinator's side of a federated router round: strategy and ``ServerApp`` wiring.

A round (Flower Message API, ``flwr.serverapp``): the strategy samples ``fraction_train`` of the
connected contributors (at least ``min_train_nodes``), sends each the router's arrays, and
averages the returned arrays weighted by ``num-examples`` (FedAvg; McMahan et al., 2017).
Replies that carry an error (a contributor that crashed or dropped out) are left out of the
average; if fewer than ``min_train_nodes`` replies succeed, the round keeps the previous arrays
instead of averaging a too-small, possibly identifying, set of updates.

Central differential privacy (Flower's strategy wrappers, ``dp`` in the router config; off by
default): ``"server"`` wraps the strategy in ``DifferentialPrivacyServerSideFixedClipping``
(the coordinator clips each update to ``clipping_norm`` and adds Gaussian noise of std
``noise_multiplier * clipping_norm / sampled`` to the average); ``"client"`` uses
``DifferentialPrivacyClientSideFixedClipping`` with ``fixedclipping_mod`` in the contributor's
``ClientApp`` (contributors clip, so the coordinator never sees an unclipped update). Under DP
every contributor weighs the same in the average (``unit-weight``), so one contributor moves it
by at most ``clipping_norm / sampled``, the sensitivity the noise is calibrated to (weighting by
example count would let a large contributor move it further), and a round in which a sampled
contributor failed is not released. Both
protect a contributor's *participation and data* in the released router, not individual
updates from the coordinator; SecAgg+ (which does hide them) is the opt-in
:mod:`.secure_aggregation`. ``server_optimizer`` swaps FedAvg's server step for Flower's FedAvgM
or FedAdam.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    Result,
    Strategy,
)
from safetensors.torch import save

from moerge.router_training.federated_base import RoundsRouter
from moerge.router_training.flower_client import CONTRIBUTOR_ID, NODE_RECORD

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class RoundRecord:
    """Who took part in one round: sampled node ids, those that replied, those that failed."""

    round: int
    sampled: list[int] = field(default_factory=list)
    succeeded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    aggregated: bool = False
    #: node id -> the contributor id its reply named (``ConfigRecord "node"``; deployment only)
    contributors: dict[int, str] = field(default_factory=dict)


#: the reply metric FedAvg weights by under DP (each contributor's reply carries 1)
UNIT_WEIGHT = "unit-weight"


class RouterFedAvg(FedAvg):
    """FedAvg that records each round's participants and needs ``min_replies`` good replies.

    ``sample_size`` is passed to FedAvg as its ``min_train_nodes``: FedAvg sizes its sample from
    the nodes connected *before* it waits for ``min_available_nodes``, so without it the first
    round of a simulation samples only the nodes that registered first.
    """

    def __init__(
        self,
        *,
        fraction_train: float,
        sample_size: int,
        min_available_nodes: int,
        min_replies: int,
        uniform: bool = False,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,  # contributors report accuracy-before with every train reply
            min_train_nodes=sample_size,
            min_available_nodes=min_available_nodes,
            weighted_by_key=UNIT_WEIGHT if uniform else "num-examples",
        )
        self.min_replies = min_replies
        #: DP rounds: every contributor counts once, and a round with a failed reply is not
        #: released (the noise is calibrated to one contributor's share of the sampled ones)
        self.uniform = uniform
        self.rounds: list[RoundRecord] = []
        #: every reply Message received (kept for audits and the privacy tests)
        self.replies: list[Message] = []
        self.keep_replies = False

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, with the sampled nodes recorded for the round."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds.append(
            RoundRecord(server_round, sampled=[m.metadata.dst_node_id for m in messages])
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregate, with each round's succeeded and failed nodes recorded (and the
        replies kept when asked)."""
        replies = list(replies)
        if self.keep_replies:
            self.replies.extend(replies)
        record = self.rounds[-1]
        record.succeeded = [m.metadata.src_node_id for m in replies if not m.has_error()]
        record.failed = [m.metadata.src_node_id for m in replies if m.has_error()]
        for m in replies:
            if not m.has_error() and NODE_RECORD in m.content.config_records:
                name = m.content.config_records[NODE_RECORD].get(CONTRIBUTOR_ID, "")
                record.contributors[m.metadata.src_node_id] = str(name)
        answered = set(record.succeeded) | set(record.failed)
        record.failed += [n for n in record.sampled if n not in answered]  # timed out
        if len(record.succeeded) < self.min_replies or (self.uniform and record.failed):
            return None, None
        record.aggregated = True
        return super().aggregate_train(server_round, replies)


class RouterFedAdam(RouterFedAvg, FedAdam):
    """:class:`RouterFedAvg` with Flower's FedAdam server step (Reddi et al., 2021, "Adaptive
    Federated Optimization"): the averaged update is a pseudo-gradient for server-side Adam."""


class RouterFedAvgM(RouterFedAvg, FedAvgM):
    """:class:`RouterFedAvg` with Flower's FedAvgM server momentum (Hsu et al., 2019)."""


SERVER_OPTIMIZERS = {"sgd": RouterFedAvg, "adam": RouterFedAdam, "momentum": RouterFedAvgM}


def build_strategy(
    router: RoundsRouter, num_nodes: int, min_available: int | None = None
) -> tuple[Strategy, RouterFedAvg]:
    """The round strategy for ``router``'s config: (outermost strategy, the FedAvg inside).

    Rounds wait until ``min_available`` (default: all ``num_nodes`` expected) contributors are
    connected (otherwise the first round of a simulation samples whichever nodes registered
    first, and experts whose contributors are missing from a round lose probability mass in it).
    A deployment passes the nodes already connected as ``num_nodes`` and a smaller
    ``min_available``, so that a node that leaves does not stall the next round.
    """
    config = router.config
    min_nodes = min(config.min_train_nodes, num_nodes)
    sampled = max(int(num_nodes * config.fraction_train), min_nodes)
    base = SERVER_OPTIMIZERS[config.server_optimizer](
        fraction_train=config.fraction_train,
        sample_size=sampled if min_available is None else min_nodes,
        min_available_nodes=num_nodes if min_available is None else min_available,
        min_replies=min_nodes,
        uniform=config.dp != "none",
    )
    if isinstance(base, RouterFedAdam):
        base.eta, base.tau = config.server_learning_rate, config.server_adam_tau
    elif isinstance(base, RouterFedAvgM):
        base.server_learning_rate = config.server_learning_rate
        base.server_momentum = config.server_momentum
        base.server_opt = True
    if config.dp == "server":
        return DifferentialPrivacyServerSideFixedClipping(
            base, config.noise_multiplier, config.clipping_norm, sampled
        ), base
    if config.dp == "client":
        return DifferentialPrivacyClientSideFixedClipping(
            base, config.noise_multiplier, config.clipping_norm, sampled
        ), base
    return base, base


def train_config(router: RoundsRouter) -> ConfigRecord:
    """What every ``train`` Message carries besides the arrays (no data, no per-node values)."""
    config = router.config
    return ConfigRecord(
        {
            "expert-ids": list(router.expert_ids),
            "temperature": float(router.temperature),
            "local-steps": config.local_steps,
            "local-batch-size": config.local_batch_size,
            "learning-rate": float(config.learning_rate),
            "proximal-mu": float(config.proximal_mu),
            "seed": config.seed,
            # The fixed tensors, as safetensors bytes: outside the averaged (and DP-noised) arrays.
            "frozen-arrays": save({k: v.contiguous() for k, v in router.frozen_arrays().items()}),
        }
    )


def router_accuracy(router: RoundsRouter, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of held-out labelled embeddings whose top-scored expert is their label."""
    with torch.no_grad():
        return float((router.logits(embeddings).argmax(-1) == labels).float().mean())


def accuracy_evaluator(
    router: RoundsRouter, embeddings: torch.Tensor, labels: torch.Tensor
) -> EvaluateFn:
    """Server-side evaluation of each round's arrays on held-out labelled embeddings."""
    probe = router.copy()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        probe.set_arrays(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": router_accuracy(probe, embeddings, labels)})

    return evaluate


@dataclass
class ServerRun:
    """Filled in by the ``ServerApp``: the strategy's result."""

    result: Result | None = None


def make_server_app(
    router: RoundsRouter,
    rounds: int,
    strategy: Strategy,
    evaluate_fn: EvaluateFn | None = None,
    timeout: float = 600.0,
) -> tuple[ServerApp, ServerRun]:
    """A ``ServerApp`` running ``rounds`` rounds from ``router``'s arrays; its result lands in
    the returned :class:`ServerRun` (the ServerApp runs in the caller's process)."""
    app = ServerApp()
    run = ServerRun()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run.result = start_rounds(grid, router, rounds, strategy, evaluate_fn, timeout)

    return app, run


def start_rounds(
    grid: Grid,
    router: RoundsRouter,
    rounds: int,
    strategy: Strategy,
    evaluate_fn: EvaluateFn | None = None,
    timeout: float = 600.0,
) -> Result:
    """The body of every round ServerApp: ``strategy.start`` from ``router``'s arrays."""
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(router.arrays()),
        num_rounds=rounds,
        timeout=timeout,
        train_config=train_config(router),
        evaluate_fn=evaluate_fn,
    )
