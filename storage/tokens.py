"""API tokens: their format, parsing and hashing, kept apart from the database.

A token reads ``{prefix}_{token_id}_{secret}``: the prefix says what it is for, the token id
is the primary key under which the registry stores the hash of the secret, and only the hash
is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

ADMIN_PREFIX = "mga"
CONTRIBUTOR_PREFIX = "mgc"
ENROLLMENT_PREFIX = "mge"
USER_PREFIX = "mgu"  # API keys of the inference-only "user" role
PREFIXES = (ADMIN_PREFIX, CONTRIBUTOR_PREFIX, ENROLLMENT_PREFIX, USER_PREFIX)

TOKEN_ID_HEX = 16
MAX_TOKEN_LENGTH = 256

# token_urlsafe(32) yields 43 characters; at least 32 keeps operator-chosen admin tokens strong.
_TOKEN_RE = re.compile(r"(mga|mgc|mge|mgu)_([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})")


def new_token(prefix: str) -> tuple[str, str]:
    """Mint a token; returns ``(token_id, token)``. The caller stores ``hash_secret`` of it."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown token prefix {prefix!r}; expected one of {PREFIXES}")
    token_id = secrets.token_hex(TOKEN_ID_HEX // 2)
    return token_id, f"{prefix}_{token_id}_{secrets.token_urlsafe(32)}"


def parse_token(token: object) -> tuple[str, str, str] | None:
    """Split a token into ``(prefix, token_id, secret)``, or None if it is not one of ours.

    Never raises: tokens arrive from the network and may be anything.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        return None
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        return None
    prefix, token_id, secret = match.groups()
    return prefix, token_id, secret


def hash_secret(secret: str) -> str:
    """SHA-256 hex digest of a secret.

    A slow password KDF (bcrypt, scrypt) is not needed: secrets are 256 random bits, so nobody
    can brute-force them from a leaked hash, and a fast hash keeps every RPC's check cheap.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Compare in constant time, so response times say nothing about the stored hash."""
    return hmac.compare_digest(hash_secret(secret).encode("ascii"), stored_hash.encode("utf-8"))
