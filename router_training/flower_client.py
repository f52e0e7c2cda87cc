"""The contributor's side of a federated router round: a Flower ``ClientApp``.

Flower's Message API (``flwr.clientapp.ClientApp``; Beutel et al., 2020, "Flower: A Friendly
Federated Learning Research Framework"): the coordinator's ServerApp sends a ``train`` Message
holding the router's trained arrays (``ArrayRecord`` "arrays") and a ``ConfigRecord`` "config"
(hyper-parameters, expert ids, and the fixed centre and whitener as safetensors bytes); the
contributor takes ``local-steps`` SGD steps on the cross-entropy of its *own* pooled embeddings,
labelled with its own expert id(s), and replies with exactly three things:

* ``ArrayRecord`` "arrays": the router's trained tensors (:data:`~.federated_base.FEDERATED_ARRAYS`:
  ``weight`` [H, E], ``bias`` [E]), nothing else -- none is per-example;
* ``MetricRecord`` "metrics": ``num-examples`` (the FedAvg weight; ``unit-weight`` = 1 under
  DP), ``train-loss`` and
  ``accuracy-before`` (top-1 accuracy of the received global router on the local data, i.e. a
  free federated evaluation of the previous round's router).

Embeddings and labels never leave :func:`local_train`. The data is supplied by a loader
``Context -> ContributorData`` so that the same app serves a simulated node
(``node_config["partition-id"]``) and a real SuperNode (``moerge contributor serve``).
With ``clip=True`` the app runs Flower's ``fixedclipping_mod`` (client-side clipping for
``DifferentialPrivacyClientSideFixedClipping``; see :mod:`.flower_server`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import Mod
from safetensors.torch import load

from moerge.router_training.federated_base import FEDERATED_ARRAYS, FROZEN_ARRAYS, ContributorData

#: Reply record naming the node's contributor (self-reported; see ``docs/federated.md``).
NODE_RECORD = "node"
CONTRIBUTOR_ID = "contributor-id"

DataLoader = Callable[[Context], ContributorData]


def local_train(
    arrays: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    data: ContributorData,
    expert_ids: list[str],
    *,
    temperature: float,
    steps: int,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``steps`` SGD steps on the local cross-entropy; returns new arrays and local metrics."""
    x = data.embeddings.to(torch.float32)
    y = data.labels(expert_ids)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != frozen["center"].shape[0]:
        raise ValueError(f"local embeddings of shape {tuple(x.shape)} do not fit the router")
    # float32 whatever the server sent (FedAdam's and SecAgg+'s arithmetic is float64)
    start = {k: arrays[k].detach().to(torch.float32) for k in FEDERATED_ARRAYS}
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    z = (x - frozen["center"]) @ frozen["whitener"]
    with torch.no_grad():
        before = (z @ params["weight"] + params["bias"]).argmax(-1) == y
    generator = torch.Generator().manual_seed(seed)
    loss_value = 0.0
    for _ in range(steps):
        rows = torch.randint(len(z), (min(batch_size, len(z)),), generator=generator)
        logits = torch.addmm(params["bias"], z[rows], params["weight"]) / temperature
        loss = F.cross_entropy(logits, y[rows])
        if proximal_mu:
            loss = loss + proximal_mu / 2 * sum(
                (params[k] - start[k]).square().sum() for k in FEDERATED_ARRAYS
            )
        grads = torch.autograd.grad(loss, [params[k] for k in FEDERATED_ARRAYS])
        with torch.no_grad():
            for name, grad in zip(FEDERATED_ARRAYS, grads, strict=True):
                params[name] -= learning_rate * grad
        loss_value = float(loss.detach())
    out = {k: params[k].detach() for k in FEDERATED_ARRAYS}
    metrics = {
        "num-examples": len(z),
        "unit-weight": 1,  # the FedAvg weight under DP: every contributor counts once
        "train-loss": loss_value,
        "accuracy-before": float(before.float().mean()),
    }
    return out, metrics


def train_from_config(
    arrays: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    data: ContributorData,
    expert_ids: list[str],
    config: Mapping[str, Any],
    node_id: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """:func:`local_train` with the round's settings as the server sends them (config keys
    ``temperature``, ``local-steps``, ...); the seed differs per round and node."""
    return local_train(
        arrays,
        frozen,
        data,
        expert_ids,
        temperature=float(config["temperature"]),
        steps=int(config["local-steps"]),
        batch_size=int(config["local-batch-size"]),
        learning_rate=float(config["learning-rate"]),
        proximal_mu=float(config["proximal-mu"]),
        seed=int(config["seed"]) * 1_000_003
        + int(config["server-round"]) * 7919
        + int(node_id % 1_000_000),
    )


def make_client_app(
    load_data: DataLoader, *, clip: bool = False, mods: list[Mod] | None = None
) -> ClientApp:
    """A ``ClientApp`` whose ``train`` runs :func:`local_train` on ``load_data(context)``.

    ``mods`` are Flower client mods run around every Message (e.g. for auditing what leaves the
    node); ``clip=True`` appends ``fixedclipping_mod``.
    """
    app = ClientApp(mods=[*(mods or []), *([fixedclipping_mod] if clip else [])])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content.config_records["config"]
        arrays = msg.content.array_records["arrays"].to_torch_state_dict()
        data = load_data(context)
        frozen_blob, expert_ids = config["frozen-arrays"], config["expert-ids"]
        if not isinstance(frozen_blob, bytes) or not isinstance(expert_ids, list):
            raise ValueError("the config must carry frozen-arrays (bytes) and expert-ids (a list)")
        frozen = load(frozen_blob)
        if set(frozen) != set(FROZEN_ARRAYS):
            raise ValueError(f"frozen-arrays must hold {FROZEN_ARRAYS}, got {sorted(frozen)}")
        new_arrays, metrics = train_from_config(
            arrays, frozen, data, [str(e) for e in expert_ids], config, context.node_id
        )
        metric_record = MetricRecord({**metrics})
        content = RecordDict({"arrays": ArrayRecord(new_arrays), "metrics": metric_record})
        contributor = context.node_config.get(CONTRIBUTOR_ID)
        if contributor:  # a deployed node names its contributor (moerge contributor serve)
            content[NODE_RECORD] = ConfigRecord({CONTRIBUTOR_ID: str(contributor)})
        return Message(content=content, reply_to=msg)

    return app


def partition_loader(partitions: list[ContributorData]) -> DataLoader:
    """Loader for simulated nodes: node ``partition-id`` holds ``partitions[partition-id]``."""

    def load(context: Context) -> ContributorData:
        return partitions[int(context.node_config["partition-id"])]

    return load
