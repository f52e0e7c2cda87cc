"""Validate an uploaded expert before anything of it is committed.

Only safetensors and JSON are accepted. The safetensors header is parsed and bounds-checked by
hand *before* any tensor is read, so a pickle payload, a truncated file or a header that declares
a huge shape is refused without being loaded. Every refusal is an :class:`ExpertInvalid` whose
message names the file and the problem.
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

from moerge.coordinator.base_model import BaseModelSpec
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
from moerge.storage.errors import InvalidArgument
from moerge.storage.registry import MAX_LIST_ITEMS
from moerge.storage.validation import check_int, check_string_list, check_text

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_JSON_BYTES = 1024 * 1024
MAX_COVARIANCE_RANK = 256
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 256
MAX_EXAMPLE_COUNT = 2**62  # a BIGINT column
DTYPE_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
HEAD_NAMES = ("classifier", "score")
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


def read_safetensors_header(path: Path, max_bytes: int) -> dict[str, Any]:
    """Parse and check a safetensors header without reading tensor data.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data buffer. Each
    entry's ``data_offsets`` must lie inside the buffer, match ``dtype`` x ``shape`` exactly, and
    the entries must tile the buffer without overlap.
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
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ExpertInvalid(name, "not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ExpertInvalid(name, "safetensors header is not a JSON object")
    data_len = size - 8 - header_len
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ExpertInvalid(name, f"tensor {key!r}: malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise ExpertInvalid(name, f"tensor {key!r}: dtype {dtype!r} not allowed")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ExpertInvalid(name, f"tensor {key!r}: bad shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
        ):
            raise ExpertInvalid(name, f"tensor {key!r}: bad data_offsets")
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if not 0 <= begin <= end <= data_len or end - begin != expected:
            raise ExpertInvalid(
                name, f"tensor {key!r}: shape {shape} does not fit its data ({end - begin} bytes)"
            )
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ExpertInvalid(name, "tensor data overlaps or leaves gaps")
        position = end
    if position != data_len:
        raise ExpertInvalid(name, "file has trailing bytes after the tensor data")
    return header


# safetensors dtype -> (numpy float type or None for BF16, same-width uint, exponent bits)
_FLOAT_BITS = {
    "F16": ("<f2", "<u2", 0x7C00),
    "BF16": (None, "<u2", 0x7F80),
    "F32": ("<f4", "<u4", 0x7F800000),
    "F64": ("<f8", "<u8", 0x7FF0000000000000),
}
_CHECK_BLOCK = 1 << 20  # elements per NaN/Inf check, in two reused scratch arrays


def _all_finite(bits: np.ndarray, exponent: int) -> bool:
    """No element has an all-ones exponent (the only encodings of NaN and Inf)."""
    flat = bits.reshape(-1)
    mask = flat.dtype.type(exponent)
    masked = np.empty(min(_CHECK_BLOCK, flat.size), flat.dtype)
    hits = np.empty(masked.size, np.bool_)
    for start in range(0, flat.size, _CHECK_BLOCK):
        block = flat[start : start + _CHECK_BLOCK]
        np.bitwise_and(block, mask, out=masked[: block.size])
        if np.equal(masked[: block.size], mask, out=hits[: block.size]).any():
            return False
    return True


def _load_tensors(path: Path, max_bytes: int) -> dict[str, np.ndarray]:
    """Memory-map the tensors once the header passed (no copy of a large adapter) and refuse
    NaN/Inf with a vectorised bit test. BF16 tensors are widened to float32."""
    header = read_safetensors_header(path, max_bytes)
    with open(path, "rb") as handle:
        data_start = 8 + struct.unpack("<Q", handle.read(8))[0]
    if path.stat().st_size > data_start:
        buffer = np.memmap(path, np.uint8, "r", offset=data_start)
    else:
        buffer = np.empty(0, np.uint8)
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        float_type, uint_type, exponent = _FLOAT_BITS[entry["dtype"]]
        begin, end = entry["data_offsets"]
        bits = buffer[begin:end].view(uint_type).reshape(entry["shape"])
        if not _all_finite(bits, exponent):
            raise ExpertInvalid(path.name, f"tensor {key!r} holds NaN or Inf")
        if float_type is None:
            tensors[key] = (bits.astype("<u4") << 16).view("<f4")
        else:
            tensors[key] = bits.view(float_type)
    return tensors


def _load_json(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ExpertInvalid(path.name, f"larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ExpertInvalid(path.name, f"not valid JSON ({exc.__class__.__name__})") from None


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
    extra = [m for m in raw.get("modules_to_save") or [] if m not in HEAD_NAMES]
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
        check_int("example_count", meta.example_count, minimum=1, maximum=MAX_EXAMPLE_COUNT)
        if meta.dp is not None:
            check_dp_record(meta.dp.noise_std, meta.dp.mechanism)
    except InvalidArgument as exc:
        raise ExpertInvalid(STATISTICS_META, str(exc)) from None
    if spec.task_type == "classification" and len(meta.label_names) < 2:
        raise ExpertInvalid(STATISTICS_META, "a classification expert needs >= 2 label_names")
    rank, _alpha, targets = check_adapter_config(_load_json(root / ADAPTER_CONFIG), spec)
    weights = _load_tensors(root / ADAPTER_WEIGHTS, max_bytes)
    modules = check_adapter_weights(weights, rank, spec, len(meta.label_names))
    stats = _load_tensors(root / STATISTICS_TENSORS, max_bytes)
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
