"""Run the poisoning consistency checks at the coordinator, and quarantine what they flag.

The checks themselves (:mod:`moerge.router_training.consistency`) are plain functions; this
module feeds them registry records and acts on their findings at two moments:

* **upload commit** (:meth:`ExpertScreen.admit`, the registry's ``admission`` hook): after the
  expert has passed validation and its blobs are stored, before the registering transaction.
  A flagged expert is registered already quarantined, so it is never routable, not even for
  an instant; the reason is its ``state_reason`` and is in the audit log;
* **router fits** (:meth:`ExpertScreen.active_experts`, the router service's ``screen`` hook):
  every active expert is checked against all the others (gate norms need peers, which an early
  upload may have lacked) and flagged ones are quarantined before the fit.

An admin who has reviewed a flagged expert and set it active again is not overruled: experts
whose last state change was made by someone other than the checks are left alone.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from moerge.coordinator.services.expert_store import ExpertStore
from moerge.router_training.base import ExpertRecord, ExpertStatistics
from moerge.router_training.consistency import ConsistencyConfig, screen
from moerge.storage.blobstore import BlobStore
from moerge.storage.records import ExpertInfo, NewExpert
from moerge.storage.registry import ADMISSION_ACTOR, Registry

if TYPE_CHECKING:
    from moerge.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)

NEW_EXPERT = "<new expert>"  # the id the candidate goes by in admission checks


class ExpertScreen:
    """Consistency checks over the registry's experts; statistics are cached per expert id."""

    def __init__(
        self, registry: Registry, experts: ExpertStore, blobs: BlobStore, config: ConsistencyConfig
    ) -> None:
        self.registry = registry
        self.experts = experts
        self.blobs = blobs
        self.config = config
        self._cache: dict[str, ExpertStatistics | None] = {}
        self._lock = threading.Lock()

    def _record(self, info: ExpertInfo) -> ExpertRecord:
        with self._lock:
            cached = info.id in self._cache
            stats = self._cache.get(info.id)
        if not cached:  # the statistics blobs only: never re-hash a peer's LoRA weights
            stats = self.experts.statistics({n: ref.sha256 for n, ref in info.files.items()})
            with self._lock:
                self._cache[info.id] = stats
        return ExpertRecord(expert_id=info.id, task_name=info.task_name, statistics=stats)

    def admit(self, contributor_id: str, spec: NewExpert) -> str:
        """Why the new expert must start quarantined, or "" to admit it (registry hook).

        Fails closed: if the checks cannot run, the expert starts quarantined and says why.
        """
        try:
            return self._admit(contributor_id, spec)
        except Exception as exc:
            log.exception("consistency checks failed on a new expert; quarantining it")
            return f"consistency checks could not run ({type(exc).__name__}); an admin must look"

    def _admit(self, contributor_id: str, spec: NewExpert) -> str:
        candidate = ExpertRecord(expert_id=NEW_EXPERT, statistics=self._read_new(spec))
        if candidate.statistics is None:  # adapter-only: no statistics to check
            return ""
        peers = self.registry.active_experts()
        records = [r for r in map(self._record, peers) if r.statistics] + [candidate]
        owners = {e.id: e.contributor_id for e in peers} | {NEW_EXPERT: contributor_id}
        findings = screen(records, owners, self.config, candidates={NEW_EXPERT})
        if findings:
            log.warning(
                "quarantining a new expert of contributor %s: %s",
                contributor_id,
                findings[0].reason,
            )
        return findings[0].reason if findings else ""

    def active_experts(self) -> list[ExpertInfo]:
        """The active experts that pass the checks; the others are quarantined (router hook).

        Fails open: every active expert passed the checks at upload, so a check that cannot
        run here (logged) must not stop every router fit.
        """
        active = self.registry.active_experts()
        try:
            records = [r for r in map(self._record, active) if r.statistics]
            findings = screen(records, {e.id: e.contributor_id for e in active}, self.config)
        except Exception:
            log.exception("consistency checks failed before a router fit; fitting without them")
            return active
        flagged = {}
        for finding in findings:
            if self._cleared_by_admin(finding.expert_id):
                continue
            self.registry.set_expert_state(
                ADMISSION_ACTOR, finding.expert_id, "quarantined", finding.reason
            )
            log.warning("quarantined expert %s: %s", finding.expert_id, finding.reason)
            flagged[finding.expert_id] = finding
        return [e for e in active if e.id not in flagged]

    def _cleared_by_admin(self, expert_id: str) -> bool:
        """Whether the expert's latest state change came from someone other than the checks."""
        page = self.registry.list_audit(page_size=1, action="expert.set_state", target_id=expert_id)
        return bool(page.items) and page.items[0].actor != ADMISSION_ACTOR

    def _read_new(self, spec: NewExpert) -> ExpertStatistics | None:
        """The candidate's statistics (None: adapter-only), read from its stored blobs."""
        return self.experts.statistics({name: ref[0] for name, ref in spec.files.items()})


def install(state: CoordinatorState) -> ExpertScreen | None:
    """Hook the checks into uploads and router fits, unless ``consistency_checks`` is off."""
    config = state.config
    if not config.consistency_checks:
        return None
    checker = ExpertScreen(
        state.registry,
        state.experts,
        state.blobs,
        ConsistencyConfig(
            copy_p_value=config.consistency_copy_p_value,
            gate_z=config.consistency_gate_z,
            gate_ratio=config.consistency_gate_ratio,
            min_peers=config.consistency_min_peers,
        ),
    )
    state.registry.admission = checker.admit
    state.routers.screen = checker.active_experts
    return checker
