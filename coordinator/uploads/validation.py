"""Validate an uploaded expert before anything of it is committed.

Only safetensors and JSON are accepted. Safetensors files are parsed by the ``safetensors``
library, which refuses a pickle payload, a truncated file, a header that is not a JSON object
(however deeply nested), gaps, overlaps and shapes that overflow before any tensor is read.
On top of it sits moerge's policy: size caps, a dtype allow-list, shapes against the base
model, and a magnitude bound on every element (NaN and Inf included), so that one expert's
huge but finite weights cannot overflow a shared ensemble to NaN. Every refusal is an
:class:`ExpertInvalid` whose message names the file and the problem.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
from safetensors import SafetensorError

from moerge.coordinator.uploads.base_model import BaseModelSpec
from moerge.coordinator.uploads.privacy_policy import privacy_refusal
from moerge.expert_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    COV_DIAG_KEY,
    COV_FACTOR_KEY,
    EXPERT_FILES,
    GATE_PREFIX,
    MEAN_KEY,
    STATISTICS_META,
    STATISTICS_TENSORS,
    StatisticsMeta,
)
from moerge.refusals import InvalidArgument
from moerge.storage.registry import MAX_LIST_ITEMS
from moerge.storage.validation import check_int, check_string_list, check_text

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_JSON_BYTES = 1024 * 1024
MAX_COVARIANCE_RANK = 256
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 256
MAX_EXAMPLE_COUNT = 2**62  # a BIGINT column
ALLOWED_DTYPES = ("F16", "BF16", "F32", "F64")  # float tensors only; ints have no use here
#: Largest magnitude of any LoRA factor or head element. Trained adapters stay far below 1
#: (PEFT initialises B to 0 and A to ~1/sqrt(d)); 1e4 leaves room for any honest training
#: while a layer's output, ~1e4 * 1e4 * rank * |x|, stays finite in float32 (max ~3.4e38).
MAX_WEIGHT_MAGNITUDE = 1e4
#: Largest magnitude of a statistics element (means, variances, covariance factors, gates):
#: hidden states of large LMs reach ~1e4, variances ~1e8; squared distances over 1e12-sized
#: entries still fit float32.
MAX_STATISTIC_MAGNITUDE = 1e12
HEAD_NAMES = ("classifier", "score")
#: Names ``modules_to_save`` may list: the heads, and DistilBERT's ``pre_classifier``, which PEFT
#: (0.22 and later) adds to every sequence-classification adapter's config. A model without
#: that module saves no tensor for it, and tensors are checked on their own (heads' only).
MODULES_TO_SAVE_NAMES = (*HEAD_NAMES, "pre_classifier")
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


class ExpertInvalid(InvalidArgument):
    """An uploaded expert failed validation; the message says which file and why."""

    def __init__(self, file: str, message: str) -> None:
        super().__init__(file, message)


@dataclass
class ValidatedExpert:
    """What the registry records about an expert that passed validation."""

    task_type: str
    lora_rank: int
    target_modules: list[str]
    label_names: list[str]
    example_count: int
    meta: StatisticsMeta
    modules: list[str] = field(default_factory=list)  # adapted module paths in the base model


def _open_safetensors(path: Path, max_bytes: int) -> safetensors.safe_open:
    """Open an untrusted safetensors file with the ``safetensors`` library, under moerge's caps.

    The library parses the header (depth-limited JSON) and refuses gaps, overlaps, truncation,
    trailing bytes and shapes whose size overflows; only the size caps are checked here first.
    """
    name = path.name
    size = path.stat().st_size
    if size > max_bytes:
        raise ExpertInvalid(name, f"{size} bytes exceeds the limit of {max_bytes}")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
    if len(prefix) < 8:
        raise ExpertInvalid(name, "not a safetensors file (shorter than 8 bytes)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise ExpertInvalid(name, "not a safetensors file (bad header length)")
    try:
        return safetensors.safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        reason = _library_reason(exc)
        raise ExpertInvalid(name, f"not a valid safetensors file ({reason})") from None


def _library_reason(exc: Exception) -> str:
    """The library's own words, on one line and bounded (they may quote the header)."""
    return " ".join(str(exc).split())[:300]


def _peak(tensor: torch.Tensor) -> float:
    """The largest magnitude of any element (Inf if any is infinite); NaN if any is NaN.

    One ``aminmax`` pass (it propagates NaN), with no scratch copy of the tensor."""
    if tensor.numel() == 0:
        return 0.0
    low, high = torch.aminmax(tensor.reshape(-1))
    return max(-float(low), float(high)) if not torch.isnan(low) else math.nan


def _load_tensors(path: Path, max_bytes: int, limit: float) -> dict[str, np.ndarray]:
    """Every tensor of a checked safetensors file, refused if any element is NaN, Inf or above
    ``limit`` in magnitude. Tensors stay views on the file's memory map (no copy of a large
    adapter), except BF16 ones, widened to float32 for numpy."""
    tensors = {}
    with _open_safetensors(path, max_bytes) as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            dtype = handle.get_slice(key).get_dtype()
            if dtype not in ALLOWED_DTYPES:
                allowed = ", ".join(ALLOWED_DTYPES)
                raise ExpertInvalid(
                    path.name, f"tensor {key!r}: dtype {dtype!r} not allowed (allowed: {allowed})"
                )
            tensor = handle.get_tensor(key)
            peak = _peak(tensor)
            if not math.isfinite(peak):
                raise ExpertInvalid(path.name, f"tensor {key!r} holds NaN or Inf")
            if peak > limit:
                raise ExpertInvalid(
                    path.name, f"tensor {key!r} holds a value of size {peak:.3g} (limit {limit:g})"
                )
            tensors[key] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return tensors


def _load_json(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ExpertInvalid(path.name, f"larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ExpertInvalid(path.name, f"not valid JSON ({exc.__class__.__name__})") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise ExpertInvalid(path.name, "not valid JSON (a number has too many digits)") from None


def _module_path(peft_module: str, spec: BaseModelSpec) -> str:
    """Map PEFT's module path to the base model's (``bert.encoder...`` -> ``encoder...``)."""
    if peft_module in spec.linear_shapes:
        return peft_module
    _, _, rest = peft_module.partition(".")
    if rest in spec.linear_shapes:
        return rest
    raise ExpertInvalid(ADAPTER_WEIGHTS, f"module {peft_module!r} is not a layer of the base model")


def check_adapter_config(raw: Any, spec: BaseModelSpec) -> tuple[int, float, list[str]]:
    """Return (rank, alpha, target module names) of a PEFT LoRA config, or refuse it."""
    if not isinstance(raw, dict):
        raise ExpertInvalid(ADAPTER_CONFIG, "expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise ExpertInvalid(
            ADAPTER_CONFIG, f"peft_type must be 'LORA', got {raw.get('peft_type')!r}"
        )
    rank = raw.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= spec.max_lora_rank:
        raise ExpertInvalid(ADAPTER_CONFIG, f"r must be an integer in 1..{spec.max_lora_rank}")
    alpha = raw.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ExpertInvalid(ADAPTER_CONFIG, "lora_alpha must be a positive number")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ExpertInvalid(ADAPTER_CONFIG, "target_modules must be a non-empty list of names")
    unknown = sorted({t for t in targets if t not in spec.allowed_targets})
    if unknown:
        raise ExpertInvalid(
            ADAPTER_CONFIG,
            f"target_modules {unknown} not allowed (allowed: {list(spec.allowed_targets)})",
        )
    for flag in ("use_dora", "use_qalora"):
        if raw.get(flag):
            raise ExpertInvalid(ADAPTER_CONFIG, f"{flag} adapters are not supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise ExpertInvalid(ADAPTER_CONFIG, "rank_pattern/alpha_pattern are not supported")
    extra = [m for m in raw.get("modules_to_save") or [] if m not in MODULES_TO_SAVE_NAMES]
    if extra:
        raise ExpertInvalid(ADAPTER_CONFIG, f"modules_to_save {extra} not allowed")
    return rank, float(alpha), sorted(set(targets))


def check_adapter_weights(
    tensors: dict[str, np.ndarray], rank: int, spec: BaseModelSpec, num_labels: int
) -> list[str]:
    """Check LoRA factor names and shapes (and the head's); return adapted module paths."""
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    head_shapes: dict[str, tuple[int, ...]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            module = _module_path(match["module"], spec)
            if module.rsplit(".", 1)[-1] not in spec.allowed_targets:
                raise ExpertInvalid(ADAPTER_WEIGHTS, f"module {module!r} is not an allowed target")
            factors.setdefault(module, {})[match["which"]] = value.shape
            continue
        parts = key.split(".")
        if len(parts) >= 4 and parts[:2] == ["base_model", "model"] and parts[2] in HEAD_NAMES:
            head_shapes[".".join(parts[3:])] = value.shape
            continue
        raise ExpertInvalid(ADAPTER_WEIGHTS, f"unexpected tensor {key!r}")
    if not factors:
        raise ExpertInvalid(ADAPTER_WEIGHTS, "holds no LoRA weights")
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise ExpertInvalid(ADAPTER_WEIGHTS, f"module {module!r} lacks lora_A or lora_B")
        d_out, d_in = spec.linear_shapes[module]
        if pair["A"] != (rank, d_in) or pair["B"] != (d_out, rank):
            raise ExpertInvalid(
                ADAPTER_WEIGHTS,
                f"module {module!r}: lora_A {pair['A']} / lora_B {pair['B']} do not match "
                f"rank {rank} and layer shape {(d_out, d_in)}",
            )
    if spec.task_type == "classification":
        want = {"weight": (num_labels, spec.hidden_size), "bias": (num_labels,)}
        got = {k.split(".")[-1]: v for k, v in head_shapes.items()}
        if (
            set(got) - {"weight", "bias"}
            or got.get("weight") != want["weight"]
            or ("bias" in got and got["bias"] != want["bias"])
        ):
            raise ExpertInvalid(
                ADAPTER_WEIGHTS,
                f"classification head must be weight {want['weight']} (+ bias), got {head_shapes}",
            )
    elif head_shapes:
        raise ExpertInvalid(ADAPTER_WEIGHTS, "a causal-LM expert must not carry a head")
    return sorted(factors)


def check_statistics(
    tensors: dict[str, np.ndarray], meta: StatisticsMeta, spec: BaseModelSpec, modules: list[str]
) -> None:
    """Dimensions against the base model; covariance parts non-negative; gates per module."""
    hidden = spec.hidden_size
    if meta.hidden_size != hidden:
        raise ExpertInvalid(
            STATISTICS_META, f"hidden_size {meta.hidden_size} != base model's {hidden}"
        )
    if meta.covariance_rank > MAX_COVARIANCE_RANK:
        raise ExpertInvalid(STATISTICS_META, f"covariance_rank above {MAX_COVARIANCE_RANK}")
    if not meta.embedding_statistics:  # adapter-only: no statistics of any data
        if tensors:
            raise ExpertInvalid(
                STATISTICS_TENSORS,
                f"an adapter-only expert carries no statistics, got tensor(s) {sorted(tensors)}",
            )
        return
    expected = {
        MEAN_KEY: (hidden,),
        COV_DIAG_KEY: (hidden,),
        COV_FACTOR_KEY: (hidden, meta.covariance_rank),
    }
    for key, shape in expected.items():
        if key not in tensors:
            raise ExpertInvalid(STATISTICS_TENSORS, f"missing tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise ExpertInvalid(
                STATISTICS_TENSORS, f"tensor {key!r} has shape {tensors[key].shape}, want {shape}"
            )
    if (tensors[COV_DIAG_KEY] < 0).any():
        raise ExpertInvalid(STATISTICS_TENSORS, f"{COV_DIAG_KEY!r} has negative variances")
    gates = {k[len(GATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(GATE_PREFIX)}
    extra = set(tensors) - set(expected) - {GATE_PREFIX + g for g in gates}
    if extra:
        raise ExpertInvalid(STATISTICS_TENSORS, f"unexpected tensor(s) {sorted(extra)}")
    for module, gate in gates.items():
        if module not in modules:
            raise ExpertInvalid(STATISTICS_TENSORS, f"gate for {module!r}, a module not adapted")
        d_in = spec.linear_shapes[module][1]
        if tuple(gate.shape) != (d_in,):
            raise ExpertInvalid(
                STATISTICS_TENSORS, f"gate {module!r} shape {gate.shape} != ({d_in},)"
            )
    if sorted(gates) != sorted(meta.gate_modules):
        raise ExpertInvalid(STATISTICS_META, "gate_modules does not list the gate tensors")


def check_dp_record(noise_std: object, mechanism: object) -> None:
    """The DP fields the registry stores as JSON: finite, non-negative noise scales by name."""
    if not isinstance(noise_std, dict) or not all(
        isinstance(k, str)
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and v >= 0
        for k, v in noise_std.items()
    ):
        raise InvalidArgument("dp.noise_std", "must map names to finite numbers >= 0")
    check_text("dp.mechanism", mechanism, 64, multiline=False)


def validate_expert_dir(root: Path, spec: BaseModelSpec, max_bytes: int) -> ValidatedExpert:
    """Validate the four files of an expert folder against the base model."""
    present = sorted(p.name for p in root.iterdir())
    if present != sorted(EXPERT_FILES):
        raise ExpertInvalid("manifest", f"expected files {sorted(EXPERT_FILES)}, got {present}")
    try:
        meta = StatisticsMeta.from_dict(_load_json(root / STATISTICS_META))
    except ExpertInvalid:
        raise
    except ValueError as exc:
        raise ExpertInvalid(STATISTICS_META, str(exc).removeprefix("statistics.json: ")) from None
    if meta.task_type != spec.task_type:
        raise ExpertInvalid(STATISTICS_META, f"task_type {meta.task_type!r} != {spec.task_type!r}")
    if meta.base_model_revision and meta.base_model_revision != spec.revision:
        raise ExpertInvalid(STATISTICS_META, "trained against a different base model revision")
    if len(meta.label_names) > MAX_LABELS:
        raise ExpertInvalid(STATISTICS_META, f"more than {MAX_LABELS} labels")
    try:  # what the registry will store must pass its checks before any blob is written
        check_string_list("label_names", meta.label_names, MAX_LIST_ITEMS, MAX_LABEL_CHARS)
        check_int(
            "example_count",
            meta.example_count,
            minimum=int(meta.embedding_statistics),  # 0 for an adapter-only expert
            maximum=MAX_EXAMPLE_COUNT,
        )
        if meta.dp is not None:
            check_dp_record(meta.dp.noise_std, meta.dp.mechanism)
    except InvalidArgument as exc:
        raise ExpertInvalid(STATISTICS_META, str(exc)) from None
    refusal = privacy_refusal(meta, spec.privacy)
    if refusal:
        raise ExpertInvalid(STATISTICS_META, refusal)
    if spec.task_type == "classification" and len(meta.label_names) < 2:
        raise ExpertInvalid(STATISTICS_META, "a classification expert needs >= 2 label_names")
    rank, _alpha, targets = check_adapter_config(_load_json(root / ADAPTER_CONFIG), spec)
    weights = _load_tensors(root / ADAPTER_WEIGHTS, max_bytes, MAX_WEIGHT_MAGNITUDE)
    modules = check_adapter_weights(weights, rank, spec, len(meta.label_names))
    stats = _load_tensors(root / STATISTICS_TENSORS, max_bytes, MAX_STATISTIC_MAGNITUDE)
    check_statistics(stats, meta, spec, modules)
    return ValidatedExpert(
        task_type=meta.task_type,
        lora_rank=rank,
        target_modules=targets,
        label_names=list(meta.label_names),
        example_count=meta.example_count,
        meta=meta,
        modules=modules,
    )
