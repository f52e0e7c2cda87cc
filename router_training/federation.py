"""Run federated rounds of the router: one function, two Flower runtimes.

``run_federated_rounds(initial_router, contributors, rounds)`` wires
:mod:`.flower_server` (strategy + ``ServerApp``) to :mod:`.flower_client` (``ClientApp``) and
returns the trained router, the per-round metrics and who took part. The same Flower objects
(``ServerApp``, ``ClientApp``, ``FedAvg``, ``Message``/``ArrayRecord``) run on either runtime:

* ``backend="simulation"``: Flower's Simulation Engine (``flwr.simulation.run_simulation``), which
  runs each ClientApp on a Ray actor. Needs ``flwr[simulation]`` (Ray); Ray serialises the
  ClientApp, with its data loader, into the actors with cloudpickle -- acceptable for simulated,
  synthetic contributors only.
* ``backend="inprocess"`` (default): :class:`InProcessGrid`, a ``Grid`` that hands each Message to
  the ClientApp in this process and returns its reply, or an error reply if the ClientApp
  raised (as a SuperLink does for a crashed node). No Ray start-up (seconds on a 2-core box),
  nothing serialised, deterministic; used by the coordinator's ``fit``, the tests and the
  benchmark.

Real rounds with real contributors use the same ``ServerApp`` under ``flwr run`` against a
SuperLink, with contributors' SuperNodes running :mod:`moerge.contributor_client.flower_cli`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from moerge.router_training.base import Router
from moerge.router_training.federated import ContributorData, FederatedRouter, as_federated
from moerge.router_training.flower_client import make_client_app, partition_loader
from moerge.router_training.flower_server import (
    RoundRecord,
    accuracy_evaluator,
    build_strategy,
    make_server_app,
)

#: Error code of a reply whose ClientApp raised.
CLIENT_APP_RAISED = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


@dataclass
class FederationOutcome:
    """What :func:`run_federated_rounds` returns."""

    router: FederatedRouter
    round_metrics: list[dict[str, float]] = field(default_factory=list)
    participants: list[RoundRecord] = field(default_factory=list)
    seconds_per_round: float = 0.0
    replies: list[Message] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Flat metrics for a router version record."""
        out = {
            "federated_rounds": float(len(self.participants)),
            "federated_rounds_aggregated": float(sum(r.aggregated for r in self.participants)),
            "federated_failed_replies": float(sum(len(r.failed) for r in self.participants)),
            "federated_seconds_per_round": self.seconds_per_round,
        }
        if self.round_metrics:
            for key, value in self.round_metrics[-1].items():
                out[f"federated_last_{key}"] = value
        return out

    def __iter__(self) -> Iterator[object]:
        """``router, round_metrics, participants = run_federated_rounds(...)``."""
        return iter((self.router, self.round_metrics, self.participants))


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ClientApps called in this process, one Message at a time."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run_id = run_id
        self._node_ids = list(range(1, num_nodes + 1))
        self._contexts = {
            node: Context(
                run_id=run_id, node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(), run_config={},
            )
            for i, node in enumerate(self._node_ids)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: object) -> None:
        raise NotImplementedError("InProcessGrid serves one fixed run")

    def run(self) -> object:
        raise NotImplementedError("InProcessGrid has no SuperLink run record")

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = self._run_id
            context = self._contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(msg, context)
            except Exception as exc:  # a crashed or dropped-out contributor
                reply = Message(
                    Error(CLIENT_APP_RAISED, f"{type(exc).__name__}: {exc}"), reply_to=msg
                )
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))


def run_federated_rounds(
    initial_router: Router,
    contributors: Sequence[ContributorData],
    rounds: int,
    *,
    client_app: ClientApp | None = None,
    evaluation: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str | None = None,
    keep_replies: bool = False,
    num_cpus: int = 2,
) -> FederationOutcome:
    """Train ``initial_router`` (a ``federated`` router, left unchanged) for ``rounds`` rounds.

    ``contributors[i]`` is the data of simulated node ``i`` (ignored when ``client_app`` is
    given, e.g. one whose loader raises to simulate drop-outs). ``evaluation`` = held-out
    ``(embeddings, expert indices)`` adds server-side ``accuracy`` per round (round 0: the
    initial router). ``backend`` overrides the router config's. Returns the trained router,
    per-round metrics (the contributors' example-weighted ``accuracy-before``/``train-loss``
    and, with ``evaluation``, ``accuracy``), and the participants of every round.
    """
    router = as_federated(initial_router).copy()
    num_nodes = len(contributors)
    if num_nodes < 1:
        raise ValueError("need at least one contributor")
    backend = backend or router.config.backend
    strategy, fedavg = build_strategy(router, num_nodes)
    fedavg.keep_replies = keep_replies
    app = client_app or make_client_app(
        partition_loader(list(contributors)), clip=router.config.dp == "client"
    )
    evaluate_fn = accuracy_evaluator(router, *evaluation) if evaluation is not None else None
    server_app, server_run = make_server_app(router, rounds, strategy, evaluate_fn)
    start = time.perf_counter()
    if backend == "inprocess":
        grid = InProcessGrid(app, num_nodes)
        saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        # What the SuperLink's ServerApp process sets: Messages take their sender from it.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        try:
            server_app(grid, Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={},
                                     state=RecordDict(), run_config={}))
        finally:
            TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    elif backend == "simulation":
        from flwr.simulation import run_simulation

        run_simulation(
            server_app=server_app, client_app=app, num_supernodes=num_nodes,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": num_cpus, "include_dashboard": False},
            },
        )
    else:
        raise ValueError(f"backend must be 'inprocess' or 'simulation', got {backend!r}")
    elapsed = time.perf_counter() - start
    result = server_run.result
    if result is None:
        raise RuntimeError("the federated ServerApp did not finish (see the Flower log)")
    if len(result.arrays):
        router.set_arrays(result.arrays.to_torch_state_dict())
    round_metrics = []
    for r in range(rounds + 1):
        row: dict[str, float] = {"round": float(r)}
        if r in result.train_metrics_clientapp:
            row.update({k: float(v) for k, v in result.train_metrics_clientapp[r].items()
                        if isinstance(v, (int, float))})
        if r in result.evaluate_metrics_serverapp:
            row.update({k: float(v) for k, v in result.evaluate_metrics_serverapp[r].items()
                        if isinstance(v, (int, float))})
        round_metrics.append(row)
    return FederationOutcome(
        router=router, round_metrics=round_metrics, participants=list(fedavg.rounds),
        seconds_per_round=elapsed / max(rounds, 1), replies=list(fedavg.replies),
    )
