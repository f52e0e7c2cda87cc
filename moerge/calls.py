"""The coordinator's unary calls, written once for :class:`moerge.Client` and
:class:`moerge.AsyncClient`.

Each method of :class:`Calls` builds its request and hands it, with the function that turns the
response into a :mod:`moerge.results` dataclass, to ``_unary``: the synchronous client runs the
call and returns the result, the asyncio client returns an awaitable of the same result. Enum
arguments take the CLI's words (``state="quarantined"``, ``aggregation="merge"``).

Every id argument takes a unique prefix, as git takes commit ids: :meth:`Calls._with_ids` passes
complete ids through untouched (no extra call) and has the client resolve the others with a
list call first (:meth:`moerge.Client.resolve_id`).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from moerge.contributor_client.connection import ClientConfig, Target
from moerge.errors import MoergeError
from moerge.results import (
    AGGREGATIONS,
    STATES,
    ApiKey,
    AuditEntry,
    BaseModel,
    Composition,
    Contributor,
    CreatedApiKey,
    DeletedExpert,
    EnrollmentToken,
    EnrollmentTokenInfo,
    Expert,
    Joined,
    Models,
    NodeKeyRegistration,
    Page,
    Predictions,
    RouterVersion,
    Routing,
    scalars,
)
from moerge.v1 import admin_pb2, common_pb2, contributor_pb2, inference_pb2

T = TypeVar("T")
DEFAULT_TIMEOUT = 300.0  # seconds per call: a first Predict loads the base model
_HEX32, _HEX16 = re.compile(r"[0-9a-f]{32}"), re.compile(r"[0-9a-f]{16}")
#: what a complete id of each kind looks like; anything else is taken as a prefix to resolve
FULL_IDS: dict[str, re.Pattern[str]] = {
    "expert": _HEX32,  # uuid4().hex
    "contributor": _HEX32,
    "API key": _HEX16,  # the id inside mgu_<id>_<secret>
    "enrollment token": _HEX16,  # the id inside mge_<id>_<secret>
}


def _state(word: str | None) -> common_pb2.ExpertState.ValueType:
    if word is None:
        return common_pb2.EXPERT_STATE_UNSPECIFIED
    if word not in STATES:
        raise MoergeError.invalid(f"state must be one of {', '.join(STATES)}, got {word!r}")
    return STATES[word]


def aggregation_number(word: str) -> inference_pb2.Aggregation.ValueType:
    """The ``Aggregation`` enum value of the CLI's word for it (``"merge"``, ...)."""
    if word not in AGGREGATIONS:
        raise MoergeError.invalid(
            f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {word!r}"
        )
    return AGGREGATIONS[word]


def _page(convert: Callable[[Any], T], field: str) -> Callable[[Any], Page[T]]:
    return lambda r: Page(tuple(convert(x) for x in getattr(r, field)), r.next_page_token)


class Calls(ABC):
    """The unary calls, shared by :class:`~moerge.Client` and :class:`~moerge.AsyncClient`;
    each subclass sends them its own way (blocking or awaited) through :meth:`_unary`."""

    def __init__(
        self,
        coordinator: str | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """``coordinator`` HOST:PORT, ``token`` and ``tls_ca`` default to the saved client
        config (``moerge join``) or ``MOERGE_COORDINATOR``/``MOERGE_TOKEN``/``MOERGE_TLS_CA``;
        ``timeout``: seconds per call."""
        self.target = Target.resolve(coordinator, token, tls_ca)
        self.timeout = timeout

    @abstractmethod
    def _unary(self, service: str, method: str, request: Any, convert: Callable[[Any], T]) -> T:
        """Send one unary call and ``convert`` its answer."""

    def _with_ids(self, kind: str, ids: Iterable[str], call: Callable[[list[str]], T]) -> T:
        """``call(full_ids)``: ids of ``kind`` as given when complete, else resolved first."""
        given = list(ids)
        if all(FULL_IDS[kind].fullmatch(i) for i in given):
            return call(given)
        return self._resolving(kind, given, call)

    @abstractmethod
    def _resolving(self, kind: str, prefixes: list[str], call: Callable[[list[str]], T]) -> T:
        """``call`` with each of ``prefixes`` resolved to the one id of ``kind`` it starts."""

    # -- contributors ------------------------------------------------------------------------

    def join(self, enrollment_token: str, name: str | None = None, *, save: bool = True) -> Joined:
        """Exchange an admin's enrollment token for a contributor credential.

        The client uses the credential from then on; ``save`` also writes it, with the
        coordinator address, to ``$MOERGE_HOME/client.json`` (mode 0600) as ``moerge join`` does.
        """
        import socket

        request = contributor_pb2.JoinRequest(
            enrollment_token=enrollment_token, name=name or socket.gethostname()
        )

        def joined(response: contributor_pb2.JoinResponse) -> Joined:
            self.target.token = response.credential
            path = None
            if save:
                path = ClientConfig(
                    coordinator=self.target.address,
                    contributor_id=response.contributor_id,
                    name=request.name,
                    credential=response.credential,
                    tls_ca=self.target.tls_ca,
                ).save()
            return Joined(response.contributor_id, request.name, response.credential, path)

        return self._unary("contributor", "Join", request, joined)

    def base_model(self) -> BaseModel:
        """The base model, revision and LoRA limits experts must be trained with."""
        request = contributor_pb2.GetBaseModelRequest()
        return self._unary("contributor", "GetBaseModel", request, BaseModel.from_proto)

    def my_experts(self) -> list[Expert]:
        """The experts this contributor registered, with their state and its reason."""
        request = contributor_pb2.ListMyExpertsRequest()
        return self._unary(
            "contributor",
            "ListMyExperts",
            request,
            lambda r: [Expert.from_proto(e) for e in r.experts],
        )

    def register_node_key(self, public_key: str) -> NodeKeyRegistration:
        """Register this contributor's SuperNode public key (OpenSSH text) with the
        coordinator, which has its SuperLink admit the key (docs/federated.md)."""
        request = contributor_pb2.RegisterNodeKeyRequest(public_key=public_key)
        return self._unary(
            "contributor",
            "RegisterNodeKey",
            request,
            lambda r: NodeKeyRegistration(r.node_key_id, r.admitted, r.flower_node_id),
        )

    # -- inference ---------------------------------------------------------------------------

    def predict(
        self,
        inputs: Iterable[str],
        *,
        top_k: int = 0,
        method: str = "",
        aggregation: str = "default",
        experts: Iterable[str] = (),
        router_version: int = 0,
        max_new_tokens: int = 0,
        composition: str = "",
        composition_version: int = 0,
    ) -> Predictions:
        """Routed predictions, one per input.

        ``top_k``: experts per input (0: the router's default); ``method``: a routing method
        ("": the active router); ``aggregation``: default, ensemble, merge, ties, dare or mix;
        ``experts``: route among these expert ids only; ``router_version``: 0 for the active one.
        ``composition``: serve this few-shot composition instead of routing (its newest
        version, or ``composition_version``); the routing arguments must then stay unset.
        """
        fields: dict[str, Any] = {
            "inputs": list(inputs),
            "top_k": top_k,
            "routing_method": method,
            "aggregation": aggregation_number(aggregation),
            "router_version": router_version,
            "max_new_tokens": max_new_tokens,
            "composition": composition,
            "composition_version": composition_version,
        }
        return self._with_ids(
            "expert",
            experts,
            lambda ids: self._unary(
                "inference",
                "Predict",
                inference_pb2.PredictRequest(expert_ids=ids, **fields),
                Predictions.from_proto,
            ),
        )

    def compositions(self, name: str = "") -> list[Composition]:
        """Stored few-shot compositions (every version; only ``name``'s if given), newest first."""
        request = inference_pb2.ListCompositionsRequest(name=name)
        return self._unary(
            "inference",
            "ListCompositions",
            request,
            lambda r: [Composition.from_proto(c) for c in r.compositions],
        )

    def route(
        self,
        inputs: Iterable[str],
        *,
        top_k: int = 0,
        method: str = "",
        experts: Iterable[str] = (),
        router_version: int = 0,
    ) -> Routing:
        """The routing decision only: which experts, with which weights, for each input."""
        fields: dict[str, Any] = {
            "inputs": list(inputs),
            "top_k": top_k,
            "routing_method": method,
            "router_version": router_version,
        }
        return self._with_ids(
            "expert",
            experts,
            lambda ids: self._unary(
                "inference",
                "Route",
                inference_pb2.RouteRequest(expert_ids=ids, **fields),
                Routing.from_proto,
            ),
        )

    def models(self) -> Models:
        """What a request may name: the active experts, the routing methods with a trained
        router, the active router and the newest version of each composition. Any credential
        that may predict may ask (a user's API key too); ``GET /v1/models`` lists the same."""
        request = inference_pb2.ListModelsRequest()
        return self._unary("inference", "ListModels", request, Models.from_proto)

    # -- administration (admin token) ---------------------------------------------------------

    def list_experts(
        self,
        *,
        state: str | None = None,
        contributor: str = "",
        task: str = "",
        page_size: int = 50,
        page_token: str = "",
    ) -> Page[Expert]:
        """One page of the registry's experts (``state``: active, quarantined or retired;
        ``contributor``: an id or a unique prefix of it)."""
        fields: dict[str, Any] = {
            "page_size": page_size,
            "page_token": page_token,
            "state": _state(state),
            "task_name": task,
        }
        return self._with_ids("contributor", [contributor] if contributor else [],
                              lambda ids: self._unary(
            "admin", "ListExperts",
            admin_pb2.ListExpertsRequest(contributor_id="".join(ids), **fields),
            _page(Expert.from_proto, "experts"),
        ))  # fmt: skip

    def get_expert(self, expert_id: str) -> Expert:
        """Every field of one expert (``expert_id``: an id or a unique prefix of it)."""
        return self._with_ids(
            "expert",
            [expert_id],
            lambda ids: self._unary(
                "admin",
                "GetExpert",
                admin_pb2.GetExpertRequest(expert_id=ids[0]),
                Expert.from_proto,
            ),
        )

    def set_expert_state(self, expert_id: str, state: str, reason: str = "") -> Expert:
        """Activate, quarantine or retire an expert (the reason goes to the audit log)."""
        number = _state(state)
        return self._with_ids(
            "expert",
            [expert_id],
            lambda ids: self._unary(
                "admin",
                "SetExpertState",
                admin_pb2.SetExpertStateRequest(expert_id=ids[0], state=number, reason=reason),
                Expert.from_proto,
            ),
        )

    def delete_expert(self, expert_id: str) -> DeletedExpert:
        """Delete an expert and garbage-collect the blobs nothing else uses."""
        return self._with_ids(
            "expert",
            [expert_id],
            lambda ids: self._unary(
                "admin",
                "DeleteExpert",
                admin_pb2.DeleteExpertRequest(expert_id=ids[0]),
                lambda r: scalars(DeletedExpert, r),
            ),
        )

    def list_router_versions(
        self, *, method: str = "", page_size: int = 50, page_token: str = ""
    ) -> Page[RouterVersion]:
        """Router versions, newest first."""
        request = admin_pb2.ListRouterVersionsRequest(
            page_size=page_size, page_token=page_token, method=method
        )
        convert = _page(RouterVersion.from_proto, "versions")
        return self._unary("admin", "ListRouterVersions", request, convert)

    def train_router(
        self,
        method: str = "",
        *,
        params: dict[str, Any] | None = None,
        rounds: int = 0,
        activate: bool = True,
    ) -> RouterVersion:
        """Fit a router now over the active experts ("": the coordinator's default method)."""
        request = admin_pb2.TrainRouterRequest(
            method=method,
            params_json=json.dumps(params) if params else "",
            no_activate=not activate,
            rounds=rounds,
        )
        return self._unary("admin", "TrainRouter", request, RouterVersion.from_proto)

    def activate_router_version(self, version: int) -> RouterVersion:
        """Make an earlier router version active again (roll back)."""
        request = admin_pb2.ActivateRouterVersionRequest(version=version)
        return self._unary("admin", "ActivateRouterVersion", request, RouterVersion.from_proto)

    def create_enrollment_token(
        self, *, note: str = "", ttl_seconds: int = 0, max_uses: int = 1
    ) -> EnrollmentToken:
        """A token a new contributor joins with (``ttl_seconds`` 0: the coordinator's default,
        ``enrollment_token_ttl_days``)."""
        request = admin_pb2.CreateEnrollmentTokenRequest(
            note=note, ttl_seconds=ttl_seconds, max_uses=max_uses
        )
        return self._unary("admin", "CreateEnrollmentToken", request, EnrollmentToken.from_proto)

    def list_enrollment_tokens(
        self, *, exclude_revoked: bool = False, page_size: int = 50, page_token: str = ""
    ) -> Page[EnrollmentTokenInfo]:
        """One page of enrollment tokens, oldest first (never their secrets); revoked ones too
        unless ``exclude_revoked``."""
        request = admin_pb2.ListEnrollmentTokensRequest(
            page_size=page_size, page_token=page_token, exclude_revoked=exclude_revoked
        )
        convert = _page(EnrollmentTokenInfo.from_proto, "tokens")
        return self._unary("admin", "ListEnrollmentTokens", request, convert)

    def revoke_enrollment_token(self, token_id: str) -> EnrollmentTokenInfo:
        """Stop an enrollment token from letting anyone else join (an id or unique prefix)."""
        return self._with_ids(
            "enrollment token",
            [token_id],
            lambda ids: self._unary(
                "admin",
                "RevokeEnrollmentToken",
                admin_pb2.RevokeEnrollmentTokenRequest(token_id=ids[0]),
                EnrollmentTokenInfo.from_proto,
            ),
        )

    def create_api_key(
        self, *, note: str = "", ttl_seconds: int = 0, rate_limit_per_minute: int = 0
    ) -> CreatedApiKey:
        """An inference-only key for a user (``ttl_seconds`` 0: never expires;
        ``rate_limit_per_minute`` 0: the coordinator's ``inference_requests_per_minute``)."""
        request = admin_pb2.CreateApiKeyRequest(
            note=note, ttl_seconds=ttl_seconds, rate_limit_per_minute=rate_limit_per_minute
        )
        return self._unary("admin", "CreateApiKey", request, CreatedApiKey.from_proto)

    def list_api_keys(
        self, *, exclude_revoked: bool = False, page_size: int = 50, page_token: str = ""
    ) -> Page[ApiKey]:
        """One page of user API keys, oldest first (never their secrets); revoked ones too unless
        ``exclude_revoked``."""
        request = admin_pb2.ListApiKeysRequest(
            page_size=page_size, page_token=page_token, exclude_revoked=exclude_revoked
        )
        return self._unary("admin", "ListApiKeys", request, _page(ApiKey.from_proto, "keys"))

    def revoke_api_key(self, key_id: str) -> ApiKey:
        """Refuse the key from its very next request on (an id or a unique prefix of it)."""
        return self._with_ids(
            "API key",
            [key_id],
            lambda ids: self._unary(
                "admin",
                "RevokeApiKey",
                admin_pb2.RevokeApiKeyRequest(key_id=ids[0]),
                ApiKey.from_proto,
            ),
        )

    def list_contributors(
        self, *, exclude_revoked: bool = False, page_size: int = 50, page_token: str = ""
    ) -> Page[Contributor]:
        """One page of contributors, oldest first, each with its expert count; revoked ones too
        unless ``exclude_revoked``."""
        request = admin_pb2.ListContributorsRequest(
            page_size=page_size, page_token=page_token, exclude_revoked=exclude_revoked
        )
        convert = _page(Contributor.from_proto, "contributors")
        return self._unary("admin", "ListContributors", request, convert)

    def revoke_contributor(self, contributor_id: str, reason: str = "") -> Contributor:
        """Revoke a contributor's credential (its experts keep their state)."""
        return self._with_ids(
            "contributor",
            [contributor_id],
            lambda ids: self._unary(
                "admin",
                "RevokeContributor",
                admin_pb2.RevokeContributorRequest(contributor_id=ids[0], reason=reason),
                Contributor.from_proto,
            ),
        )

    def audit_log(
        self, *, action: str = "", target: str = "", page_size: int = 100, page_token: str = ""
    ) -> Page[AuditEntry]:
        """The audit log, newest first. ``target`` is the exact target id: entries are about
        many kinds of thing (router version numbers, uploads, ...), so no prefix is resolved."""
        request = admin_pb2.ListAuditLogRequest(
            page_size=page_size, page_token=page_token, action=action, target_id=target
        )
        return self._unary(
            "admin", "ListAuditLog", request, _page(AuditEntry.from_proto, "entries")
        )
