"""The SuperLink admits the SuperNodes of enrolled, unrevoked contributors, and no others.

Contributors register their SuperNode's public key with ``RegisterNodeKey`` (under their
credential); the registry keeps it. Whenever that list can change -- a key registered, a
contributor revoked, the coordinator started -- :func:`admit_node_keys` makes the registered
nodes of the coordinator's SuperLink exactly the registry's admitted keys, through Flower's
Control API. Only a SuperLink this coordinator started with TLS runs Flower's node
authentication; otherwise there is nothing to keep in step and any node may connect.
"""

from __future__ import annotations

import logging

from moerge.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)


def admit_node_keys(state: CoordinatorState) -> dict[str, int]:
    """Bring the SuperLink's registered SuperNodes in line with the registry; returns the
    admitted keys' OpenSSH text -> Flower node id (empty without node authentication).
    A SuperLink that cannot be reached is logged, not raised: the registry has changed
    already, and the next call (at the latest the next start) puts the SuperLink right."""
    federation = state.routers.federation
    if federation is None or not federation.node_auth:
        return {}
    keys = {k.public_key: k.contributor_id for k in state.registry.admitted_node_keys()}
    try:
        return federation.admit_node_keys(keys)
    except Exception:
        log.exception("could not update the SuperLink's SuperNode keys")
        return {}
