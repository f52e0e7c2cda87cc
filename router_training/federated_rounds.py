"""Run federated rounds of a router: one function, two Flower runtimes.

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

Real rounds with real contributors run the same strategy and ClientApp on Flower's deployment
runtime (a SuperLink and the contributors' SuperNodes): :mod:`.superlink`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from uuid import uuid4

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from moerge.router_training.federated_base import FEDERATED_ARRAYS, ContributorData, RoundsRouter
from moerge.router_training.flower_client import make_client_app, partition_loader
from moerge.router_training.flower_server import (
    RoundRecord,
    RouterFedAvg,
    accuracy_evaluator,
    build_strategy,
    make_server_app,
    router_accuracy,
)

#: Error code of a reply whose ClientApp raised.
CLIENT_APP_RAISED = ErrorCode.CLIENT_APP_RAISED_EXCEPTION

R = TypeVar("R", bound=RoundsRouter)


@dataclass
class FederationOutcome(Generic[R]):
    """What :func:`run_federated_rounds` returns."""

    router: R
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
        for row in self.round_metrics[1:]:  # round by round (round 0 = the starting router)
            for key, value in row.items():
                if key != "round":
                    out[f"federated_round_{int(row['round'])}_{key}"] = value
        for record in self.participants:
            out[f"federated_round_{record.round}_succeeded"] = float(len(record.succeeded))
            out[f"federated_round_{record.round}_failed"] = float(len(record.failed))
        for contributor, count in self.contributor_rounds().items():
            out[f"federated_contributor_{contributor}_rounds"] = float(count)
        out.update(self.privacy())
        return out

    def privacy(self) -> dict[str, float]:
        """``dp_epsilon`` at ``dp_delta`` spent by the released rounds, under DP with noise
        (:mod:`.federated_privacy`); nothing without DP or with clipping only."""
        config = self.router.config
        if config.dp == "none" or not config.noise_multiplier > 0 or not self.participants:
            return {}
        from moerge.router_training.federated_privacy import rounds_privacy

        sampled = max(len(r.sampled) for r in self.participants)
        nodes = {n for r in self.participants for n in r.sampled}
        spent = rounds_privacy(
            config.noise_multiplier,
            sum(r.aggregated for r in self.participants),
            max(sampled, 1),
            max(len(nodes), sampled, 1),
            config.dp_delta,
        )
        return {
            "dp_epsilon": spent.epsilon,
            "dp_delta": spent.delta,
            "dp_noise_multiplier": spent.noise_multiplier,
            "dp_released_rounds": float(spent.released_rounds),
        }

    def contributor_rounds(self) -> dict[str, int]:
        """Contributor id -> rounds in which its node's update was aggregated (nodes that named
        a contributor: SuperNodes started by ``moerge contributor serve``)."""
        counts: dict[str, int] = {}
        for record in self.participants:
            for node in record.succeeded if record.aggregated else []:
                name = record.contributors.get(node)
                if name:
                    counts[name] = counts.get(name, 0) + 1
        return counts

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
                run_id=run_id,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, node in enumerate(self._node_ids)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: object) -> None:
        """Refused: the in-process grid serves the one run it was made for."""
        raise NotImplementedError("InProcessGrid serves one fixed run")

    @property
    def run(self) -> Run:
        """Only the run id (Flower's legacy workflows, e.g. SecAgg+, read ``grid.run.run_id``)."""
        return Run.create_empty(self._run_id)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A Message to one node, as Flower's grids build them."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The simulated nodes, one per contributor."""
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message's ClientApp at once on its node's context (a copy of the content, as if
        serialised) and keep the reply for :meth:`pull_messages`; the new message ids."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = self._run_id
            context = self._contexts[msg.metadata.dst_node_id]
            # As if serialised: a node gets its own config records (a workflow may send one
            # RecordDict to all nodes, and Flower's mods pop keys from it, e.g. SecAgg+'s stage).
            msg.content = RecordDict(
                {
                    k: ConfigRecord(dict(v)) if isinstance(v, ConfigRecord) else v
                    for k, v in msg.content.items()
                }
            )
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
        """The replies to these ids that have not been pulled yet."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push and pull at once: replies are ready as soon as the push returns."""
        return list(self.pull_messages(self.push_messages(messages)))


def run_federated_rounds(
    initial_router: R,
    contributors: Sequence[ContributorData],
    rounds: int,
    *,
    client_app: ClientApp | None = None,
    evaluation: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str | None = None,
    keep_replies: bool = False,
    num_cpus: int = 2,
) -> FederationOutcome[R]:
    """Train ``initial_router`` (a ``federated`` router, left unchanged) for ``rounds`` rounds.

    ``contributors[i]`` is the data of simulated node ``i`` (ignored when ``client_app`` is
    given, e.g. one whose loader raises to simulate drop-outs). ``evaluation`` = held-out
    ``(embeddings, expert indices)`` adds server-side ``accuracy`` per round (round 0: the
    initial router). ``backend`` overrides the router config's. Returns the trained router,
    per-round metrics (the contributors' example-weighted ``accuracy-before``/``train-loss``
    and, with ``evaluation``, ``accuracy``), and the participants of every round.
    """
    if not isinstance(initial_router, RoundsRouter):
        method = getattr(initial_router, "method", type(initial_router).__name__)
        raise ValueError(f"federated rounds need a 'federated' router, got '{method}'")
    router = initial_router.copy()
    num_nodes = len(contributors)
    if num_nodes < 1:
        raise ValueError("need at least one contributor")
    backend = backend or router.config.backend
    if router.config.secure_aggregation:
        return _run_secure_rounds(router, contributors, rounds, client_app, evaluation, backend)
    strategy, fedavg = build_strategy(router, num_nodes)
    fedavg.keep_replies = keep_replies
    app = client_app or make_client_app(
        partition_loader(list(contributors)), clip=router.config.dp == "client"
    )
    evaluate_fn = accuracy_evaluator(router, *evaluation) if evaluation is not None else None
    server_app, server_run = make_server_app(router, rounds, strategy, evaluate_fn)
    start = time.perf_counter()
    if backend == "inprocess":
        run_in_process(server_app, app, num_nodes)
    elif backend == "simulation":
        from flwr.simulation import run_simulation

        run_simulation(
            server_app=server_app,
            client_app=app,
            num_supernodes=num_nodes,
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
    return collect_outcome(router, result, fedavg, rounds, elapsed)


def run_in_process(server_app: ServerApp, client_app: ClientApp, num_nodes: int) -> None:
    """Run ``server_app`` against ``num_nodes`` in-process nodes of ``client_app``."""
    grid = InProcessGrid(client_app, num_nodes)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    # What the SuperLink's ServerApp process sets: Messages take their sender from it.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        context = Context(
            run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}
        )
        server_app(grid, context)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _run_secure_rounds(
    router: R,
    contributors: Sequence[ContributorData],
    rounds: int,
    client_app: ClientApp | None,
    evaluation: tuple[torch.Tensor, torch.Tensor] | None,
    backend: str,
) -> FederationOutcome[R]:
    """Rounds with SecAgg+ (:mod:`.secure_aggregation`), in process only."""
    from moerge.router_training.secure_aggregation import (
        make_secure_client_app,
        make_secure_server_app,
    )

    if backend != "inprocess":
        raise ValueError("secure_aggregation runs on the 'inprocess' backend only")
    num_nodes = len(contributors)
    app = client_app or make_secure_client_app(partition_loader(list(contributors)))
    server_app, strategy = make_secure_server_app(router, rounds, num_nodes)
    start = time.perf_counter()
    run_in_process(server_app, app, num_nodes)
    elapsed = time.perf_counter() - start
    current = zip(FEDERATED_ARRAYS, strategy.current, strict=True)
    router.set_arrays({k: torch.from_numpy(v) for k, v in current})
    round_metrics = [
        {"round": float(r), **strategy.round_metrics.get(r, {})} for r in range(rounds + 1)
    ]
    if evaluation is not None:  # the final router only: the workflow keeps no per-round copies
        round_metrics[-1]["accuracy"] = router_accuracy(router, *evaluation)
    return FederationOutcome(
        router=router,
        round_metrics=round_metrics,
        participants=list(strategy.rounds),
        seconds_per_round=elapsed / max(rounds, 1),
    )


def collect_outcome(
    router: R, result: Result, fedavg: RouterFedAvg, rounds: int, seconds: float
) -> FederationOutcome[R]:
    """The strategy's ``Result`` as a :class:`FederationOutcome`; sets ``router``'s arrays."""
    if len(result.arrays):
        router.set_arrays(result.arrays.to_torch_state_dict())
    round_metrics = []
    for r in range(rounds + 1):
        row: dict[str, float] = {"round": float(r)}
        if r in result.train_metrics_clientapp:
            row.update(
                {
                    k: float(v)
                    for k, v in result.train_metrics_clientapp[r].items()
                    if isinstance(v, (int, float))
                }
            )
        if r in result.evaluate_metrics_serverapp:
            row.update(
                {
                    k: float(v)
                    for k, v in result.evaluate_metrics_serverapp[r].items()
                    if isinstance(v, (int, float))
                }
            )
        round_metrics.append(row)
    return FederationOutcome(
        router=router,
        round_metrics=round_metrics,
        participants=list(fedavg.rounds),
        seconds_per_round=seconds / max(rounds, 1),
        replies=list(fedavg.replies),
    )
