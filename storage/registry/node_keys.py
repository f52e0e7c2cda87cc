"""Contributors' Flower SuperNode public keys: who may take part in federated router rounds.

A contributor registers the public key of its SuperNode under its own credential; the
coordinator's SuperLink (Flower's node authentication) then admits exactly the keys of
contributors who are not revoked (:meth:`NodeKeysMixin.admitted_node_keys`). Revoking a
contributor leaves its keys here, so the audit trail stays, but takes them off that list.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from moerge.refusals import AlreadyExists, FailedPrecondition, InvalidArgument
from moerge.storage.models import Contributor, NodeKey
from moerge.storage.records import NodeKeyInfo
from moerge.storage.registry.base import RegistryBase, utcnow
from moerge.storage.registry.contributors import get_contributor_row
from moerge.storage.registry.helpers import check_actor
from moerge.storage.validation import check_id

#: Keys one contributor may hold (one per SuperNode it runs).
MAX_NODE_KEYS = 16
#: An OpenSSH ECDSA P-521 key is ~270 characters; anything much longer is not a node key.
MAX_KEY_TEXT = 1024
#: The curves Flower's node authentication accepts (``uses_nist_ec_curve``).
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def node_key_text(public_key: object) -> str:
    """The OpenSSH text of a SuperNode public key, as ``flwr supernode register`` reads it
    (a NIST-curve ECDSA key, ``ecdsa-sha2-nistp384 AAAA...``); the comment is dropped so that
    the same key always has the same text and id."""
    if not isinstance(public_key, str) or not public_key.strip():
        raise InvalidArgument("public_key", "must be an OpenSSH public key line")
    if len(public_key) > MAX_KEY_TEXT:
        raise InvalidArgument("public_key", f"must be at most {MAX_KEY_TEXT} characters")
    try:
        key = serialization.load_ssh_public_key(public_key.strip().encode("ascii"))
    except (ValueError, UnicodeError, TypeError) as exc:
        raise InvalidArgument("public_key", f"is not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise InvalidArgument("public_key", "must be an ECDSA key on a NIST curve (P-256/384/521)")
    openssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    return key.public_bytes(*openssh).decode()


class NodeKeysMixin(RegistryBase):
    """Register a contributor's SuperNode keys; list the keys the SuperLink should admit."""

    def register_node_key(self, actor: str, contributor_id: str, public_key: str) -> NodeKeyInfo:
        """Record ``public_key`` as one of the contributor's SuperNode keys. Registering the same
        key again returns it unchanged; a key another contributor holds is ALREADY_EXISTS."""
        actor = check_actor(actor)
        contributor_id = check_id("contributor_id", contributor_id)
        text = node_key_text(public_key)
        key_id = hashlib.sha256(text.encode()).hexdigest()
        with self._write() as session:
            contributor = get_contributor_row(session, contributor_id)
            if contributor.revoked_at is not None:
                raise FailedPrecondition(f"contributor {contributor_id} is revoked")
            row = session.get(NodeKey, key_id)
            if row is not None:
                if row.contributor_id != contributor_id:
                    raise AlreadyExists("this SuperNode key belongs to another contributor")
                return _node_key_info(row)
            held = session.scalar(
                select(func.count()).where(NodeKey.contributor_id == contributor_id)
            )
            if (held or 0) >= MAX_NODE_KEYS:
                raise FailedPrecondition(f"a contributor may register {MAX_NODE_KEYS} node keys")
            row = NodeKey(
                id=key_id, contributor_id=contributor_id, public_key=text, created_at=utcnow()
            )
            session.add(row)
            self._audit(
                session,
                actor,
                "node_key.register",
                "contributor",
                contributor_id,
                {"node_key_id": key_id},
            )
            return _node_key_info(row)

    def admitted_node_keys(self) -> list[NodeKeyInfo]:
        """The SuperNode keys of every contributor who is not revoked, oldest first."""
        with self._read() as session:
            rows = session.scalars(
                select(NodeKey)
                .join(Contributor, Contributor.id == NodeKey.contributor_id)
                .where(Contributor.revoked_at.is_(None))
                .order_by(NodeKey.created_at, NodeKey.id)
            )
            return [_node_key_info(r) for r in rows]


def _node_key_info(row: NodeKey) -> NodeKeyInfo:
    return NodeKeyInfo(
        id=row.id,
        contributor_id=row.contributor_id,
        public_key=row.public_key,
        created_at=row.created_at,
    )
