"""Results about experts and the contributor's side: an expert and its privacy report, joining,
node keys, the base model every expert must use, an upload."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

from moerge.results.base import STATE_WORDS, Result, scalars, utc_time
from moerge.v1 import common_pb2, contributor_pb2


@dataclasses.dataclass(frozen=True)
class ExpertFile(Result):
    """One file of an expert folder, as registered."""

    name: str
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class Privacy(Result):
    """The differential privacy a contributor applied to its statistics."""

    epsilon: float
    delta: float
    clip_norm: float


@dataclasses.dataclass(frozen=True)
class PrivacyRelease(Result):
    """One data-dependent part of an expert and how it was released."""

    what: str  # "statistics", "adapter" or "gates"
    mechanism: str  # "gaussian_pld", "dp_sgd", "none" (no DP), "external" (brought adapter)
    epsilon: float | None  # None when the release is not DP
    delta: float | None


@dataclasses.dataclass(frozen=True)
class PrivacyReport(Result):
    """What an expert releases about its contributor's data (docs/security.md)."""

    releases: tuple[PrivacyRelease, ...]
    all_dp: bool  # every release is DP: epsilon/delta cover the whole expert
    epsilon: float | None  # the DP releases composed; None when none is DP
    delta: float | None
    statistics_opt_out: bool  # the contributor turned the statistics' default DP off
    unit: str

    @classmethod
    def from_proto(cls, m: common_pb2.PrivacyReport) -> PrivacyReport:
        """The result of the protobuf message ``m``."""

        def release(r: common_pb2.PrivacyRelease) -> PrivacyRelease:
            dp = r.mechanism not in ("none", "external", "")
            return PrivacyRelease(
                r.what, r.mechanism, r.epsilon if dp else None, r.delta if dp else None
            )

        any_dp = m.epsilon > 0
        return cls(
            releases=tuple(release(r) for r in m.releases),
            all_dp=m.all_dp,
            epsilon=m.epsilon if any_dp else None,
            delta=m.delta if any_dp else None,
            statistics_opt_out=m.statistics_opt_out,
            unit=m.unit or "example",
        )

    def summary(self) -> str:
        """One line for a table cell: ``DP eps 4`` / ``not DP (opted out)`` / ..."""
        stats = next((r for r in self.releases if r.what == "statistics"), None)
        if stats is None or stats.epsilon is None:
            text = "statistics NOT DP" + (" (opted out)" if self.statistics_opt_out else "")
        else:
            text = f"statistics eps {stats.epsilon:g}"
        if self.all_dp and self.epsilon is not None:
            return f"all DP, eps {self.epsilon:.3g}"
        weights = [r.what for r in self.releases if r.what != "statistics" and r.epsilon is None]
        return text + (f"; {'+'.join(weights)} not DP" if weights else "")


@dataclasses.dataclass(frozen=True)
class Quality(Result):
    """How good an expert was on its contributor's validation split, beside its baselines.

    What ``moerge train`` recorded in statistics.json (``ExpertQuality`` of
    :mod:`moerge.expert_format`): reported by the contributor's client, not verified by the
    coordinator. A figure that was not measured is None.
    """

    validation_examples: int
    validation_accuracy: float | None  # classification
    probe_accuracy: float | None  # logistic regression on the frozen base model's embeddings
    majority_accuracy: float | None  # always the most common training label
    validation_loss: float | None  # mean cross-entropy (causal LM: per token)
    base_validation_loss: float | None  # causal LM: the base model's, without the adapter

    @classmethod
    def from_proto(cls, m: common_pb2.ExpertQuality) -> Quality:
        """The result of the protobuf message ``m`` (an unset figure is None)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "validation_examples"]
        present = {field.name: value for field, value in m.ListFields()}  # set figures only
        figures = {name: present.get(name) for name in names}
        return cls(validation_examples=m.validation_examples, **figures)

    def summary(self) -> str:
        """One short line: accuracy beside the probe's and the majority class's, or the
        validation loss beside the base model's."""
        if self.validation_accuracy is not None:
            baselines = [
                f"{label} {value:.3f}"
                for label, value in (
                    ("probe", self.probe_accuracy),
                    ("majority", self.majority_accuracy),
                )
                if value is not None
            ]
            extra = f" ({', '.join(baselines)})" if baselines else ""
            return f"accuracy {self.validation_accuracy:.3f}{extra}"
        if self.validation_loss is not None:
            base = self.base_validation_loss
            extra = "" if base is None else f" (base {base:.3f})"
            return f"loss {self.validation_loss:.3f}{extra}"
        return ""


@dataclasses.dataclass(frozen=True)
class Expert(Result):
    """A registered expert: what it was trained for, its state and its privacy report."""

    expert_id: str
    name: str
    version: int
    contributor_id: str
    task_name: str
    task_description: str
    task_type: str  # "classification" or "causal_lm"
    state: str  # "active", "quarantined" or "retired"
    state_reason: str
    base_model_id: str
    lora_rank: int
    target_modules: tuple[str, ...]
    label_names: tuple[str, ...]
    example_count: int
    files: tuple[ExpertFile, ...]
    privacy: Privacy | None  # None: the statistics carry no DP noise
    created_at: datetime | None
    content_sha256: str
    privacy_report: PrivacyReport | None = None  # what was released, under which (eps, delta)
    quality: Quality | None = None  # None: statistics.json recorded no validation figures

    @classmethod
    def from_proto(cls, m: common_pb2.Expert) -> Expert:
        """The result of the protobuf message ``m``."""
        return scalars(
            cls,
            m,
            state=STATE_WORDS.get(m.state, "unspecified"),
            target_modules=tuple(m.target_modules),
            label_names=tuple(m.label_names),
            files=tuple(scalars(ExpertFile, f) for f in m.files),
            privacy=scalars(Privacy, m.privacy) if m.HasField("privacy") else None,
            created_at=utc_time(m.created_at),
            privacy_report=(
                PrivacyReport.from_proto(m.privacy_report) if m.HasField("privacy_report") else None
            ),
            quality=Quality.from_proto(m.quality) if m.HasField("quality") else None,
        )


@dataclasses.dataclass(frozen=True)
class Joined(Result):
    """What joining a coordinator gave this contributor."""

    contributor_id: str
    name: str
    credential: str  # shown once: the coordinator keeps only its hash
    config_path: Path | None  # where it was saved (None with ``save=False``)


@dataclasses.dataclass(frozen=True)
class NodeKeyRegistration(Result):
    """A SuperNode key the coordinator recorded; ``admitted``: its SuperLink lets the node in
    now (``flower_node_id`` is then Flower's id for it)."""

    node_key_id: str
    admitted: bool
    flower_node_id: int


@dataclasses.dataclass(frozen=True)
class BaseModel(Result):
    """What experts must be trained against (``GetBaseModel``)."""

    base_model_id: str
    revision: str  # sha256 over the base model's weight files
    allowed_target_modules: tuple[str, ...]
    max_lora_rank: int
    hidden_size: int
    task_type: str
    max_upload_bytes: int
    chunk_size: int

    @classmethod
    def from_proto(cls, m: contributor_pb2.BaseModelInfo) -> BaseModel:
        """The result of the protobuf message ``m``."""
        return scalars(cls, m, allowed_target_modules=tuple(m.allowed_target_modules))


@dataclasses.dataclass(frozen=True)
class Upload(Result):
    """An upload's outcome: the registered expert."""

    expert: Expert
    created: bool  # False: identical content was already registered
    upload_id: str

    @classmethod
    def from_proto(cls, m: contributor_pb2.UploadExpertResponse) -> Upload:
        """The result of the protobuf message ``m``."""
        return cls(Expert.from_proto(m.expert), m.created, m.upload_id)
