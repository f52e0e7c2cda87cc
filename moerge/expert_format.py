"""The on-disk format of an expert: what a contributor uploads and the coordinator stores.

One expert is a directory (or, at the coordinator, a set of content-addressed blobs) holding:

``adapter_config.json``
    PEFT's own LoRA config, written by ``PeftModel.save_pretrained``.
``adapter_model.safetensors``
    PEFT's own LoRA weights. For classification experts the task head (``classifier.*``,
    saved by PEFT through ``modules_to_save``) is included, as PEFT does for ``SEQ_CLS``.
``statistics.safetensors``
    Summary statistics of the contributor's data under the *frozen base model* (tensors below).
``statistics.json``
    The scalar part of the statistics and their provenance (:class:`StatisticsMeta`).

Tensor keys in ``statistics.safetensors`` (``H`` = hidden size, ``k`` = covariance rank)::

    embedding.mean        [H]     mean of the L2-normalised, mean-pooled last hidden states
    embedding.cov_diag    [H]     diagonal part D of the covariance  Cov ~= U U^T + diag(D)
    embedding.cov_factor  [H, k]  low-rank factor U of the covariance
    gates.<module>        [d_in]  PHATGOOSE gate vector of one LoRA module, e.g.
                                  ``gates.encoder.layer.0.attention.self.query`` (the module's
                                  path in the *base* model, without PEFT's prefixes)

An **adapter-only** expert (``embedding_statistics: false`` in ``statistics.json``: a PEFT
adapter trained elsewhere whose data is gone) carries no statistics of any data: its
``statistics.safetensors`` holds no tensor, ``example_count`` is 0 and no gates are listed. The
JSON still names its task, labels and base model, which serving needs. Routers that learn from
statistics or gates skip such experts; Arrow routes them from the LoRA weights
(docs/routing.md).

Nothing here is per-example: no text, token ids or single embeddings ever enter these files.
Only safetensors and JSON are read, never pickle. This module imports no torch so that the
coordinator's validators and ``storage`` can use it; tensors are read with numpy.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STATISTICS_TENSORS = "statistics.safetensors"
STATISTICS_META = "statistics.json"

#: Every file of an expert, in the order they are streamed on upload.
EXPERT_FILES: tuple[str, ...] = (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATISTICS_TENSORS,
    STATISTICS_META,
)

MEAN_KEY = "embedding.mean"
COV_DIAG_KEY = "embedding.cov_diag"
COV_FACTOR_KEY = "embedding.cov_factor"
GATE_PREFIX = "gates."


@dataclass
class DifferentialPrivacy:
    """Parameters of the Gaussian mechanism applied to the statistics (None when off).

    ``clip_norm`` bounds each embedding's L2 norm before aggregation; ``noise_std`` records the
    standard deviation of the noise added to each released quantity so the coordinator can
    show (and routers can account for) the noise scale.
    """

    epsilon: float
    delta: float
    clip_norm: float
    noise_std: dict[str, float] = field(default_factory=dict)
    mechanism: str = "gaussian"


#: Mechanisms that come with (epsilon, delta); "none" and "external" (a brought adapter) do not.
DP_MECHANISMS = ("gaussian_pld", "gaussian", "dp_sgd")


@dataclass
class PrivacyRelease:
    """One part of an expert that depends on the contributor's data, and how it was released.

    ``what``: ``statistics`` (count, label counts, mean, covariance), ``adapter`` (LoRA weights
    and head) or ``gates`` (PHATGOOSE gates). ``mechanism``: ``gaussian_pld`` (the statistics'
    Gaussian releases), ``dp_sgd`` (Opacus per-example clipping and Gaussian noise, Poisson
    sampling) or ``none``; ``epsilon``/``delta`` are null for ``none``. ``details`` are the
    mechanism's parameters (noise multiplier, clipping norm, sampling rate, steps).
    """

    what: str
    mechanism: str
    epsilon: float | None = None
    delta: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrivacyReport:
    """What an expert releases about its contributor's data, under which (epsilon, delta).

    ``epsilon``/``delta`` compose every DP release with one accountant (``dp_accounting``'s
    PLD); they cover the whole expert only when ``all_dp`` is true (otherwise some release has
    no DP and they cover the DP releases alone). ``statistics_opt_out`` records that the
    contributor turned the statistics' default DP off (``--no-dp``). ``unit`` is what one
    neighbouring data set differs by. Self-declared by the contributor's client: the
    coordinator checks it against its policy but cannot verify the noise.
    """

    releases: list[PrivacyRelease] = field(default_factory=list)
    epsilon: float | None = None
    delta: float | None = None
    all_dp: bool = False
    statistics_opt_out: bool = False
    unit: str = "example"
    accountant: str = "dp_accounting PLD"
    not_covered: list[str] = field(default_factory=list)

    def release(self, what: str) -> PrivacyRelease | None:
        """The release of one part (``statistics``, ``adapter`` or ``gates``), or None when the
        report has none."""
        return next((r for r in self.releases if r.what == what), None)

    def summary(self) -> str:
        """One line: ``statistics gaussian_pld eps 4 | adapter none | ... ; total eps 4.2``."""
        parts = []
        for r in self.releases:
            budget = "" if r.epsilon is None else f" (eps {r.epsilon:.3g}, delta {r.delta:.2g})"
            parts.append(f"{r.what}: {r.mechanism}{budget}")
        text = "; ".join(parts)
        if self.epsilon is not None:
            scope = "everything released" if self.all_dp else "the DP releases"
            text += f"; {scope}: eps {self.epsilon:.3g}, delta {self.delta:.2g}"
        if self.statistics_opt_out:
            text += "; DP on the statistics turned off by the contributor"
        return text

    def validate(self) -> None:
        """Refuse malformed releases with a ``ValueError`` naming the field of statistics.json."""
        if not isinstance(self.releases, list):
            raise ValueError("statistics.json: field 'privacy.releases' must be a list")
        for i, r in enumerate(self.releases):
            if not isinstance(r, PrivacyRelease):
                raise ValueError(f"statistics.json: field 'privacy.releases[{i}]' is invalid")
            for name in ("what", "mechanism"):
                value = getattr(r, name)
                if not isinstance(value, str) or not value or len(value) > 64:
                    raise ValueError(
                        f"statistics.json: field 'privacy.releases[{i}].{name}' must be a "
                        "short string"
                    )
            _check_budget(
                f"privacy.releases[{i}]", r.epsilon, r.delta, r.mechanism in DP_MECHANISMS
            )
            if not isinstance(r.details, dict):
                raise ValueError(f"statistics.json: 'privacy.releases[{i}].details' not an object")
        _check_budget("privacy", self.epsilon, self.delta, self.all_dp)
        for name in ("all_dp", "statistics_opt_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"statistics.json: field 'privacy.{name}' must be a boolean")
        if not all(isinstance(x, str) for x in self.not_covered):
            raise ValueError("statistics.json: field 'privacy.not_covered' must be strings")

    @classmethod
    def from_dict(cls, raw: Any) -> PrivacyReport:
        """Parse the ``privacy`` object of statistics.json; a ``ValueError`` names what is
        malformed."""
        if not isinstance(raw, dict):
            raise ValueError("statistics.json: field 'privacy' must be an object or null")
        data = dict(raw)
        releases = data.get("releases", [])
        if not isinstance(releases, list) or not all(isinstance(r, dict) for r in releases):
            raise ValueError("statistics.json: field 'privacy.releases' must be a list of objects")
        try:
            data["releases"] = [PrivacyRelease(**r) for r in releases]
            report = cls(**data)
        except TypeError as exc:
            raise ValueError(f"statistics.json: field 'privacy': {exc}") from None
        report.validate()
        return report


def _check_budget(name: str, epsilon: object, delta: object, required: bool) -> None:
    """Epsilon > 0 finite and delta in [0, 1), both or neither (both when ``required``)."""
    if epsilon is None and delta is None and not required:
        return
    ok = (
        isinstance(epsilon, (int, float))
        and not isinstance(epsilon, bool)
        and math.isfinite(epsilon)
        and epsilon > 0
        and isinstance(delta, (int, float))
        and not isinstance(delta, bool)
        and 0 <= delta < 1
    )
    if not ok:
        raise ValueError(f"statistics.json: field '{name}' needs epsilon > 0 and delta in [0, 1)")


@dataclass
class ExpertQuality:
    """How good the expert is on its contributor's held-out validation split, beside baselines.

    Every figure is optional (None where not measured, e.g. no validation split). Accuracies
    are in [0, 1]; ``probe_accuracy`` is a logistic regression on the frozen base model's
    pooled embeddings and ``majority_accuracy`` always answers the most common training label:
    an expert that does not beat them adds nothing a router could not get cheaper. Losses are
    mean cross-entropies; for causal LM experts ``base_validation_loss`` is the base model's
    on the same completions, without the adapter.
    """

    validation_examples: int = 0
    validation_accuracy: float | None = None
    probe_accuracy: float | None = None
    majority_accuracy: float | None = None
    validation_loss: float | None = None
    base_validation_loss: float | None = None

    def validate(self) -> None:
        """Refuse counts, accuracies and losses outside their ranges, naming the field of
        statistics.json."""
        _check_int("quality.validation_examples", self.validation_examples, minimum=0)
        for name in ("validation_accuracy", "probe_accuracy", "majority_accuracy"):
            _check_number(f"quality.{name}", getattr(self, name), 0.0, 1.0)
        for name in ("validation_loss", "base_validation_loss"):
            _check_number(f"quality.{name}", getattr(self, name), 0.0, 1e6)


@dataclass
class StatisticsMeta:
    """The JSON half of the statistics (``statistics.json``)."""

    example_count: int
    hidden_size: int
    covariance_rank: int
    task_name: str
    task_type: str = "classification"  # "classification" or "causal_lm"
    task_description: str = ""
    label_names: list[str] = field(default_factory=list)
    label_counts: list[int] = field(default_factory=list)
    base_model_id: str = ""
    base_model_revision: str = ""
    pooling: str = "mean+l2"
    gate_modules: list[str] = field(default_factory=list)
    dp: DifferentialPrivacy | None = None
    format_version: int = FORMAT_VERSION
    quality: ExpertQuality | None = None  # absent from files written before the LP-FT recipe
    privacy: PrivacyReport | None = None  # absent from files written before DP by default
    #: False for an adapter-only expert: no data statistics at all (see the module docstring)
    embedding_statistics: bool = True

    def to_json(self) -> str:
        """statistics.json's text; ``embedding_statistics`` is written only when false, so older
        coordinators still read the file."""
        fields = asdict(self)
        if self.embedding_statistics:  # written only when false: older coordinators accept it
            del fields["embedding_statistics"]
        return json.dumps(fields, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StatisticsMeta:
        """Build from parsed JSON, raising ``ValueError`` naming the offending field."""
        if not isinstance(raw, dict):
            raise ValueError("statistics.json: expected a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"statistics.json: unknown field(s) {unknown}")
        data = dict(raw)
        dp = data.get("dp")
        if dp is not None:
            if not isinstance(dp, dict):
                raise ValueError("statistics.json: field 'dp' must be an object or null")
            try:
                data["dp"] = DifferentialPrivacy(**dp)
            except TypeError as exc:
                raise ValueError(f"statistics.json: field 'dp': {exc}") from None
        quality = data.get("quality")
        if quality is not None:
            if not isinstance(quality, dict):
                raise ValueError("statistics.json: field 'quality' must be an object or null")
            try:
                data["quality"] = ExpertQuality(**quality)
            except TypeError as exc:
                raise ValueError(f"statistics.json: field 'quality': {exc}") from None
        if data.get("privacy") is not None:
            data["privacy"] = PrivacyReport.from_dict(data["privacy"])
        try:
            meta = cls(**data)
        except TypeError as exc:
            raise ValueError(f"statistics.json: {exc}") from None
        meta.validate()
        return meta

    @classmethod
    def read(cls, path: str | Path) -> StatisticsMeta:
        """Read and validate statistics.json; unreadable JSON is a ``ValueError`` too."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"statistics.json: not valid JSON ({exc})") from None
        return cls.from_dict(raw)

    def write(self, path: str | Path) -> None:
        """Write statistics.json as :meth:`to_json` gives it."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def validate(self) -> None:
        """Check types and ranges; raise ``ValueError`` naming the field."""
        if not isinstance(self.embedding_statistics, bool):
            raise ValueError("statistics.json: field 'embedding_statistics' must be a boolean")
        _check_int("example_count", self.example_count, minimum=int(self.embedding_statistics))
        if not self.embedding_statistics:
            self._validate_adapter_only()
        _check_int("hidden_size", self.hidden_size, minimum=1)
        _check_int("covariance_rank", self.covariance_rank, minimum=0)
        _check_int("format_version", self.format_version, minimum=1)
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"statistics.json: format_version {self.format_version} unsupported")
        for name in (
            "task_name",
            "task_type",
            "task_description",
            "base_model_id",
            "base_model_revision",
            "pooling",
        ):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"statistics.json: field '{name}' must be a string")
        if self.task_type not in ("classification", "causal_lm"):
            raise ValueError("statistics.json: field 'task_type' must be classification|causal_lm")
        if not all(isinstance(x, str) for x in self.label_names):
            raise ValueError("statistics.json: field 'label_names' must be a list of strings")
        if not all(isinstance(x, int) and x >= 0 for x in self.label_counts):
            raise ValueError("statistics.json: field 'label_counts' must be non-negative ints")
        if self.label_counts and len(self.label_counts) != len(self.label_names):
            raise ValueError("statistics.json: 'label_counts' and 'label_names' differ in length")
        if not all(isinstance(x, str) for x in self.gate_modules):
            raise ValueError("statistics.json: field 'gate_modules' must be a list of strings")
        if self.dp is not None:
            for name in ("epsilon", "delta", "clip_norm"):
                value = getattr(self.dp, name)
                if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                    raise ValueError(
                        f"statistics.json: field 'dp.{name}' must be a positive number"
                    )
        if self.quality is not None:
            self.quality.validate()
        if self.privacy is not None:
            self.privacy.validate()

    def _validate_adapter_only(self) -> None:
        """An adapter-only expert claims no data: nothing counted, summarised or gated."""
        claims = {
            "example_count": self.example_count != 0,
            "covariance_rank": self.covariance_rank != 0,
            "label_counts": bool(self.label_counts),
            "gate_modules": bool(self.gate_modules),
            "dp": self.dp is not None,
        }
        bad = [name for name, claimed in claims.items() if claimed]
        if bad:
            raise ValueError(
                f"statistics.json: an adapter-only expert (embedding_statistics false) has no "
                f"data statistics, but sets {bad}"
            )


def adapter_only_meta(
    task_name: str,
    hidden_size: int,
    label_names: list[str],
    task_type: str = "classification",
    task_description: str = "",
    base_model_id: str = "",
) -> StatisticsMeta:
    """``statistics.json`` of an adapter-only expert (its ``statistics.safetensors`` is empty)."""
    meta = StatisticsMeta(
        example_count=0,
        hidden_size=hidden_size,
        covariance_rank=0,
        task_name=task_name,
        task_type=task_type,
        task_description=task_description,
        label_names=list(label_names),
        base_model_id=base_model_id,
        pooling="",
        embedding_statistics=False,
    )
    meta.validate()
    return meta


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"statistics.json: field '{name}' must be an integer >= {minimum}")


def _check_number(name: str, value: object, low: float, high: float) -> None:
    """None, or a finite number in [low, high]."""
    if value is None:
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ValueError(f"statistics.json: field '{name}' must be a number in [{low}, {high}]")


def gate_key(module_name: str) -> str:
    """``gates.<module>`` key of a module path in the base model."""
    return GATE_PREFIX + module_name
