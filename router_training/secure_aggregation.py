"""Secure aggregation (SecAgg+) of router rounds: the coordinator sees only the sum of updates.

SecAgg+ (Bell et al., 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead")
masks every contributor's quantised update with pairwise and private random masks that cancel
in the sum, so the coordinator learns the weighted average of the round, not any single update.
flwr 1.41 implements it only for its legacy API: ``SecAggPlusWorkflow`` (server) runs inside a
``DefaultWorkflow`` over a legacy ``Strategy``, and ``secaggplus_mod`` (client) wraps a legacy
``NumPyClient``. This module adapts the router's round to that API, opt-in with
``secure_aggregation=True`` in the router config:

* the contributor (:class:`RouterNumPyClient`) runs the same :func:`~.flower_client.local_train`
  and returns the *update* ``new - received`` rather than the new weights: the protocol clips
  every value of ``update * num_examples / max_weight`` to ``[-clipping_range, clipping_range]``
  before quantising it, and the router's bias (LDA's, with ``log pi``) is far outside any small
  range while one round's update is small;
* the coordinator (:class:`SecureRouterFedAvg`) receives the example-weighted average update,
  already unmasked by the workflow, and adds it to the current weights: FedAvg of
  ``theta + delta_i`` is ``theta + FedAvg(delta_i)``, so the result equals plain FedAvg up to
  the quantisation step ``2 * clipping_range / quantization_range`` (per contributor, scaled by
  ``max_weight / num_examples``).

Failures: the workflow drops a contributor that fails before the masking stage; as long as
``reconstruction_threshold`` shares of each mask survive, the sum is recovered. Central DP
(``dp``) is not combined with it here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load, save

from moerge.router_training.federated_base import FEDERATED_ARRAYS, ContributorData, RoundsRouter
from moerge.router_training.flower_client import train_from_config
from moerge.router_training.flower_server import RoundRecord

DataLoader = Callable[[Context], ContributorData]


class RouterNumPyClient(NumPyClient):
    """A contributor's local round for the legacy API: returns its update, not its weights."""

    def __init__(self, data: ContributorData, node_id: int) -> None:
        self.data = data
        self.node_id = node_id

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        """One round of local training on this node's data, from the arrays and config the server
        sent; Flower's legacy NumPy client interface, which SecAgg+ needs."""
        arrays = {
            k: torch.from_numpy(np.asarray(p, dtype=np.float32))
            for k, p in zip(FEDERATED_ARRAYS, parameters, strict=True)
        }
        new, metrics = train_from_config(
            arrays,
            load(bytes(config["frozen-arrays"])),  # type: ignore[arg-type]
            self.data,
            str(config["expert-ids"]).split("\n"),
            config,
            self.node_id,
        )
        update = [(new[k] - arrays[k]).numpy().astype(np.float64) for k in FEDERATED_ARRAYS]
        return (
            update,
            int(metrics["num-examples"]),
            {
                "train-loss": metrics["train-loss"],
                "accuracy-before": metrics["accuracy-before"],
            },
        )


def make_secure_client_app(load_data: DataLoader) -> ClientApp:
    """A legacy ``ClientApp`` with ``secaggplus_mod`` around :class:`RouterNumPyClient`."""

    def client_fn(context: Context):  # returns flwr's legacy Client
        return RouterNumPyClient(load_data(context), context.node_id).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


class SecureRouterFedAvg(FedAvg):
    """Legacy FedAvg over *updates*: adds the (securely) averaged update to the current weights."""

    def __init__(self, router: RoundsRouter, num_nodes: int, min_replies: int) -> None:
        config = router.config
        super().__init__(
            fraction_fit=config.fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=max(int(num_nodes * config.fraction_train), min_replies),
            min_available_clients=num_nodes,
            initial_parameters=ndarrays_to_parameters(
                [router.arrays()[k].numpy() for k in FEDERATED_ARRAYS]
            ),
            on_fit_config_fn=lambda server_round: {**self.fit_config, "server-round": server_round},
            accept_failures=True,
        )
        self.fit_config = fit_config(router)
        self.min_replies = min_replies
        self.current = [router.arrays()[k].numpy().astype(np.float64) for k in FEDERATED_ARRAYS]
        self.rounds: list[RoundRecord] = []
        self.round_metrics: dict[int, dict[str, float]] = {}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's fit instructions, with the sampled nodes recorded for the round."""
        pairs = super().configure_fit(server_round, parameters, client_manager)
        self.rounds.append(RoundRecord(server_round, sampled=[p.node_id for p, _ in pairs]))
        return pairs

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """FedAvg's aggregate of the securely summed updates, with the round's succeeded and failed
        nodes recorded."""
        record = self.rounds[-1]
        record.succeeded = [proxy.node_id for proxy, _ in results]
        record.failed = [n for n in record.sampled if n not in record.succeeded]
        if len(results) < self.min_replies:
            return None, {}
        # Every result carries the same, already aggregated (unmasked) update.
        update = parameters_to_ndarrays(results[0][1].parameters)
        self.current = [c + u for c, u in zip(self.current, update, strict=True)]
        record.aggregated = True
        total = sum(res.num_examples for _, res in results)
        self.round_metrics[server_round] = {
            key: sum(res.num_examples * float(res.metrics[key]) for _, res in results) / total
            for key in ("train-loss", "accuracy-before")
        }
        return ndarrays_to_parameters(self.current), {}


def fit_config(router: RoundsRouter) -> dict[str, Scalar]:
    """:func:`~.flower_server.train_config` as legacy scalars (no lists in a legacy config)."""
    config = router.config
    return {
        "expert-ids": "\n".join(router.expert_ids),
        "temperature": float(router.temperature),
        "local-steps": config.local_steps,
        "local-batch-size": config.local_batch_size,
        "learning-rate": float(config.learning_rate),
        "proximal-mu": float(config.proximal_mu),
        "seed": config.seed,
        "frozen-arrays": save({k: v.contiguous() for k, v in router.frozen_arrays().items()}),
    }


def make_secure_server_app(
    router: RoundsRouter, rounds: int, num_nodes: int, timeout: float = 600.0
) -> tuple[ServerApp, SecureRouterFedAvg]:
    """A ``ServerApp`` running ``rounds`` SecAgg+ rounds; the strategy holds the result."""
    config = router.config
    min_replies = min(config.min_train_nodes, num_nodes)
    strategy = SecureRouterFedAvg(router, num_nodes, min_replies)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=rounds, round_timeout=timeout),
            strategy=strategy,
        )
        workflow = SecAggPlusWorkflow(
            num_shares=config.secagg_num_shares,
            reconstruction_threshold=config.secagg_reconstruction_threshold,
            max_weight=config.secagg_max_weight,
            clipping_range=config.secagg_clipping_range,
            quantization_range=config.secagg_quantization_range,
            timeout=timeout,
        )
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)

    return app, strategy
