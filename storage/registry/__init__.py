"""The expert registry: the one object the coordinator uses to read and change persistent state.

Each method runs in its own short transaction (a new session per call), so one ``Registry``
can be shared by all of the coordinator's threads. A method that changes state writes its
audit entry in the same transaction; a method that refuses a call raises one of
:mod:`moerge.refusals`' errors and leaves the database as it was. Database failures are not wrapped.

One ``Registry`` class, one module per aggregate (each a mixin over
:class:`~moerge.storage.registry.base.RegistryBase`, which holds the sessions):

=================  ==============================================================
``base``           sessions, the write generation, the audit writer, constants
``helpers``        argument checks and keyset paging shared by the aggregates
``credentials``    admin and contributor credentials; ``authenticate`` any token
``api_keys``       users' inference-only API keys
``contributors``   enrollment tokens, ``join``, contributors and their revocation
``node_keys``      contributors' Flower SuperNode keys; those the SuperLink admits
``experts``        registering, listing, state changes, deletion and blob GC
``uploads``        resumable upload rows; committing one registers its expert
``routers``        router versions and the one active version
``audit``          reading the audit log
=================  ==============================================================

Named compositions are kept in :mod:`moerge.storage.compositions`, on top of a ``Registry``.
"""

from moerge.storage.registry.api_keys import ApiKeysMixin
from moerge.storage.registry.audit import AuditMixin
from moerge.storage.registry.base import (
    ADMIN,
    CONTRIBUTOR,
    LAST_USED_RESOLUTION,
    MAX_REASON,
    MAX_TEXT,
    SYSTEM_ACTOR,
    USER,
    utcnow,
)
from moerge.storage.registry.contributors import ContributorsMixin
from moerge.storage.registry.credentials import CredentialsMixin
from moerge.storage.registry.experts import ADMISSION_ACTOR, MAX_FILES, MAX_LIST_ITEMS, ExpertsMixin
from moerge.storage.registry.node_keys import NodeKeysMixin
from moerge.storage.registry.routers import RoutersMixin
from moerge.storage.registry.uploads import UploadsMixin


class Registry(
    CredentialsMixin,
    ApiKeysMixin,
    ContributorsMixin,
    NodeKeysMixin,
    UploadsMixin,
    ExpertsMixin,
    RoutersMixin,
    AuditMixin,
):
    """Contributors, credentials, SuperNode keys, experts, uploads, router versions, audit log.

    ``engine`` should come from :func:`moerge.storage.db.make_engine` (it configures SQLite
    for concurrent use) and have been migrated with :func:`moerge.storage.db.upgrade`.
    """


__all__ = [
    "ADMIN",
    "ADMISSION_ACTOR",
    "CONTRIBUTOR",
    "LAST_USED_RESOLUTION",
    "MAX_FILES",
    "MAX_LIST_ITEMS",
    "MAX_REASON",
    "MAX_TEXT",
    "SYSTEM_ACTOR",
    "USER",
    "Registry",
    "utcnow",
]
