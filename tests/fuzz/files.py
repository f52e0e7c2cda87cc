"""Damaged experts: each mutator turns the four valid files (and manifest) into a hostile upload.

A case is ``Upload(files, names, sizes, digests, expert_name, ...)``; by default the manifest
describes the files honestly, so the damage must be caught by validation, not by a checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import pickle
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moerge.expert_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    COV_DIAG_KEY,
    EXPERT_FILES,
    STATISTICS_META,
    STATISTICS_TENSORS,
)
from moerge.v1 import contributor_pb2
from tests.fuzz.messages import EVIL_STRINGS

_NONCES = itertools.count()


@dataclass(frozen=True)
class Upload:
    """What a contributor sends: file contents in manifest order, and the manifest's claims."""

    files: tuple[tuple[str, bytes], ...]
    expert_name: str = "fuzzed"
    task_name: str = "toy"
    task_description: str = ""
    claimed: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> size/sha256 lies
    label: str = ""
    nonce: int = field(default_factory=lambda: next(_NONCES))  # a fresh upload id per case

    def manifest(self) -> contributor_pb2.UploadManifest:
        entries = []
        for name, data in self.files:
            lie = self.claimed.get(name, {})
            entries.append(
                contributor_pb2.UploadFile(
                    name=name,
                    size=lie.get("size", len(data)),
                    sha256=lie.get("sha256", hashlib.sha256(data).hexdigest()),
                )
            )
        key = "\n".join(
            [
                str(self.nonce),
                self.expert_name,
                self.task_name,
                *(f"{f.name}:{f.size}:{f.sha256}" for f in entries),
            ]
        )
        return contributor_pb2.UploadManifest(
            upload_id=hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:32],
            expert_name=self.expert_name,
            task_name=self.task_name,
            task_description=self.task_description,
            files=entries,
        )

    def stream(self, chunk: int = 4096) -> list[contributor_pb2.UploadExpertRequest]:
        data = b"".join(d for _, d in self.files)
        out = [contributor_pb2.UploadExpertRequest(manifest=self.manifest())]
        for at in range(0, len(data), chunk):
            out.append(
                contributor_pb2.UploadExpertRequest(
                    chunk=contributor_pb2.UploadChunk(offset=at, data=data[at : at + chunk])
                )
            )
        return out


def load_valid(expert_dir: Path) -> Upload:
    return Upload(files=tuple((n, (expert_dir / n).read_bytes()) for n in EXPERT_FILES))


def _with(upload: Upload, name: str, data: bytes, label: str) -> Upload:
    files = tuple((n, data if n == name else d) for n, d in upload.files)
    return replace(upload, files=files, label=label)


def _get(upload: Upload, name: str) -> bytes:
    return dict(upload.files)[name]


# -- safetensors -----------------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict[str, Any], body: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _tensor_keys(header: dict[str, Any]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _header_damage(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, body = split_safetensors(data)
    key = rng.choice(_tensor_keys(header))
    entry = header[key]
    kind = rng.randrange(12)
    if kind == 0:
        entry["shape"] = [2**40, 2**40]
    elif kind == 1:
        entry["shape"] = [rng.choice([-1, 2**63, 3.5, "4", None])]
    elif kind == 2:
        entry["data_offsets"] = [0, 2**64 + rng.randrange(100)]
    elif kind == 3:
        entry["data_offsets"] = [rng.choice([-8, 2**63]), rng.choice([0, 8, 2**63])]
    elif kind == 4:
        entry["data_offsets"] = [0, entry["data_offsets"][1]]  # overlap
    elif kind == 5:
        entry["dtype"] = rng.choice(["I64", "U8", "BOOL", "F8_E4M3", "object", "", 4])
    elif kind == 6:
        header[key + "x"] = dict(entry)  # duplicate data, unknown name
    elif kind == 7:
        del header[key]
    elif kind == 8:
        header["__metadata__"] = rng.choice([[1], "x", {"a": {"b": 1}}, None])
    elif kind == 9:
        return join_safetensors(header, body, rng.choice([2**63, 2**32, len(data), 0, 1])), "hlen"
    elif kind == 10:
        entry.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    else:
        header[rng.choice(EVIL_STRINGS)] = entry
    return join_safetensors(header, body), f"header:{kind}"


def _tensor_values(data: bytes, rng: random.Random, value: float) -> bytes:
    """Write ``value`` (NaN, Inf, huge) into one float of one tensor, header untouched."""
    header, body = split_safetensors(data)
    key = rng.choice(_tensor_keys(header))
    begin, end = header[key]["data_offsets"]
    if end - begin < 4 or header[key]["dtype"] != "F32":
        return data
    at = begin + 4 * rng.randrange((end - begin) // 4)
    raw = bytearray(body)
    raw[at : at + 4] = np.float32(value).tobytes()
    return join_safetensors(header, bytes(raw))


def _reshaped(data: bytes, key: str, shape: list[int]) -> bytes:
    """Replace tensor ``key`` with zeros of ``shape`` (a well-formed file of wrong dimensions)."""
    header, body = split_safetensors(data)
    tensors = {}
    for k in _tensor_keys(header):
        begin, end = header[k]["data_offsets"]
        tensors[k] = np.frombuffer(body[begin:end], np.float32).reshape(header[k]["shape"])
    tensors[key] = np.zeros(shape, np.float32)
    from safetensors.numpy import save

    return save(tensors)


# -- the mutators ------------------------------------------------------------------------------

Mutator = Callable[[Upload, random.Random], Upload]
MUTATORS: dict[str, Mutator] = {}


def mutator(fn: Mutator) -> Mutator:
    MUTATORS[fn.__name__] = fn
    return fn


@mutator
def truncated(up: Upload, rng: random.Random) -> Upload:
    name = rng.choice(EXPERT_FILES)
    data = _get(up, name)
    return _with(up, name, data[: rng.randrange(len(data))], f"truncated {name}")


@mutator
def bit_flipped(up: Upload, rng: random.Random) -> Upload:
    name = rng.choice(EXPERT_FILES)
    data = bytearray(_get(up, name))
    for _ in range(rng.choice([1, 1, 2, 8])):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return _with(up, name, bytes(data), f"bit-flipped {name}")


@mutator
def safetensors_header(up: Upload, rng: random.Random) -> Upload:
    name = rng.choice([ADAPTER_WEIGHTS, STATISTICS_TENSORS])
    data, kind = _header_damage(_get(up, name), rng)
    return _with(up, name, data, f"{kind} {name}")


@mutator
def deep_json_header(up: Upload, rng: random.Random) -> Upload:
    """A safetensors header of deeply nested JSON arrays (once a RecursionError: INTERNAL)."""
    name = rng.choice([ADAPTER_WEIGHTS, STATISTICS_TENSORS])
    depth = rng.choice([200, 5_000, 50_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    raw = opener * depth + b"1" + closer * depth
    return _with(up, name, struct.pack("<Q", len(raw)) + raw, f"header nested {depth} deep {name}")


@mutator
def same_content_new_name(up: Upload, rng: random.Random) -> Upload:
    """The valid expert again under a fresh name: accepted, but never a second expert."""
    name = f"renamed-{rng.randrange(10**9)}"
    return replace(up, expert_name=name, label=f"same content as {name}")


@mutator
def pickle_payload(up: Upload, rng: random.Random) -> Upload:
    """A pickle that would run code if loaded, disguised as safetensors or named .bin/.pt."""

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pwned",))

    payload = pickle.dumps({"weight": Exploit()}, protocol=rng.choice([2, 4, 5]))
    if rng.random() < 0.5:
        name = rng.choice([ADAPTER_WEIGHTS, STATISTICS_TENSORS])
        return _with(up, name, payload, f"pickle as {name}")
    renamed = rng.choice(["adapter_model.bin", "adapter_model.pt", "pytorch_model.bin"])
    files = tuple((renamed, payload) if n == ADAPTER_WEIGHTS else (n, d) for n, d in up.files)
    return replace(up, files=files, label=f"pickle named {renamed}")


@mutator
def tensor_values(up: Upload, rng: random.Random) -> Upload:
    name = rng.choice([ADAPTER_WEIGHTS, STATISTICS_TENSORS])
    value = rng.choice([float("nan"), float("inf"), -float("inf")])
    return _with(up, name, _tensor_values(_get(up, name), rng, value), f"{value} in {name}")


@mutator
def statistics_dimensions(up: Upload, rng: random.Random) -> Upload:
    data = _get(up, STATISTICS_TENSORS)
    header, _ = split_safetensors(data)
    key = rng.choice(_tensor_keys(header))
    shape = list(header[key]["shape"])
    choice = rng.randrange(4)
    if choice == 0:
        shape[0] += rng.choice([-1, 1, 31])
    elif choice == 1:
        shape = [*shape, 2]
    elif choice == 2:
        shape = []
    else:
        shape = [0] * len(shape)
    out = _reshaped(data, key, shape)
    if key == COV_DIAG_KEY and rng.random() < 0.5:
        out = _reshaped(data, key, [shape[0] if shape else 32])
        out = _tensor_values(out, rng, -1.0)  # negative variance
    return _with(up, STATISTICS_TENSORS, out, f"statistics {key} shape {shape}")


def _json_edit(up: Upload, name: str, rng: random.Random, edits: list[tuple[str, Any]]) -> Upload:
    raw = json.loads(_get(up, name))
    key, value = rng.choice(edits)
    if value is _DELETE:
        raw.pop(key, None)
    else:
        raw[key] = value
    data = json.dumps(raw, allow_nan=True).encode()
    return _with(up, name, data, f"{name} {key}={str(value)[:40]}")


_DELETE = object()
_HUGE = 2**70


@mutator
def adapter_config(up: Upload, rng: random.Random) -> Upload:
    edits: list[tuple[str, Any]] = [
        ("target_modules", ["key"]),
        ("target_modules", ["query", "dense"]),
        ("target_modules", ["../../etc/passwd"]),
        ("target_modules", "query"),
        ("target_modules", []),
        ("target_modules", [None, 3]),
        ("target_modules", [[]]),
        ("target_modules", ".*"),
        ("r", 0),
        ("r", -4),
        ("r", 8),  # does not match the weights
        ("r", 10**9),
        ("r", _HUGE),
        ("r", "4"),
        ("r", 4.5),
        ("r", True),
        ("r", None),
        ("lora_alpha", float("nan")),
        ("lora_alpha", -1),
        ("lora_alpha", "8"),
        ("peft_type", "IA3"),
        ("peft_type", None),
        ("use_dora", True),
        ("rank_pattern", {"query": 64}),
        ("modules_to_save", ["embeddings"]),
        ("modules_to_save", "classifier"),
        ("modules_to_save", [{}]),
        ("peft_type", _DELETE),
        ("r", _DELETE),
    ]
    return _json_edit(up, ADAPTER_CONFIG, rng, edits)


@mutator
def statistics_meta(up: Upload, rng: random.Random) -> Upload:
    edits: list[tuple[str, Any]] = [
        ("hidden_size", 33),
        ("hidden_size", 0),
        ("hidden_size", _HUGE),
        ("covariance_rank", 10**6),
        ("covariance_rank", -1),
        ("example_count", 0),
        ("example_count", -5),
        ("example_count", _HUGE),
        ("example_count", 1.5),
        ("label_names", ["neg"]),
        ("label_names", ["neg", "pos", "extra"]),
        ("label_names", ["neg\x00", "pos"]),
        ("label_names", ["a" * 300, "b"]),
        ("label_names", ["'; DROP TABLE experts; --", "../../x"]),
        ("label_names", ["\u202e", "pos"]),
        ("label_names", [1, 2]),
        ("label_names", [str(i) for i in range(10_001)]),
        ("label_counts", [1]),
        ("label_counts", [-1, 1]),
        ("task_type", "causal_lm"),
        ("task_type", "regression"),
        ("gate_modules", []),
        ("gate_modules", ["encoder.layer.9.attention.self.query"]),
        ("dp", {"epsilon": float("nan"), "delta": 0.1, "clip_norm": 1.0, "noise_std": {}}),
        ("dp", {"epsilon": 1.0}),
        ("dp", {"epsilon": 1.0, "delta": 1e-5, "clip_norm": 1.0, "noise_std": {"m": float("nan")}}),
        ("dp", {"epsilon": 1.0, "delta": 1e-5, "clip_norm": 1.0, "noise_std": [1]}),
        ("dp", {"epsilon": 1.0, "delta": 1e-5, "clip_norm": 1.0, "mechanism": "\x00"}),
        ("dp", [1]),
        ("format_version", 99),
        ("base_model_revision", "0" * 64),
        ("pooling", "max"),
        ("unknown_field", 1),
        ("task_name", "x" * 5000),
        ("hidden_size", _DELETE),
    ]
    return _json_edit(up, STATISTICS_META, rng, edits)


@mutator
def garbage_json(up: Upload, rng: random.Random) -> Upload:
    name = rng.choice([ADAPTER_CONFIG, STATISTICS_META])
    data = rng.choice(
        [
            b"",
            b"{",
            b"null",
            b"[]",
            b'"text"',
            b"\xff\xfe{}",
            b"{" * 10_000,
            b'{"a": 1e999999}',
            b'{"r": NaN}',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"peft_type": "LORA", "r": 4, "target_modules": ["query"]' + b" " * (1 << 20) + b"}",
        ]
    )
    return _with(up, name, data, f"garbage {name} {data[:12]!r}")


@mutator
def manifest_lies(up: Upload, rng: random.Random) -> Upload:
    """Wrong sha256, wrong/negative/overflowing sizes, odd file names in the manifest."""
    name = rng.choice(EXPERT_FILES)
    kind = rng.randrange(8)
    if kind == 0:
        return replace(up, claimed={name: {"sha256": "0" * 64}}, label=f"wrong sha256 {name}")
    if kind == 1:
        size = rng.choice([-1, -(2**63), 2**63 - 1, 2**40, len(_get(up, name)) + 1])
        return replace(up, claimed={name: {"size": size}}, label=f"size {size} {name}")
    if kind == 2:
        return replace(up, claimed={name: {"sha256": "A" * 64}}, label="uppercase sha256")
    if kind == 3:
        return replace(up, claimed={name: {"size": len(_get(up, name)) - 1}}, label="short size")
    new = rng.choice(
        [
            "../" + name,
            "/etc/" + name,
            name + "\x00.txt",
            "sub/" + name,
            name.upper(),
            "..",
            "",
            "adapter_model.bin",
        ]
    )
    if kind == 4:  # renamed
        files = tuple((new if n == name else n, d) for n, d in up.files)
    elif kind == 5:  # a fifth file
        files = (*up.files, (new, b"{}"))
    elif kind == 6:  # a file missing
        files = tuple((n, d) for n, d in up.files if n != name)
    else:  # a file twice
        files = (*up.files, (name, _get(up, name)))
    return replace(up, files=files, label=f"manifest files {[n for n, _ in files]}")


@mutator
def hostile_names(up: Upload, rng: random.Random) -> Upload:
    """Traversal, NUL, unicode and SQL metacharacters in names and the description."""
    value = rng.choice(EVIL_STRINGS)
    field_name = rng.choice(["expert_name", "task_name", "task_description"])
    damaged = up
    if rng.random() < 0.8:  # usually with a damaged file too, so that most cases are refused
        damaged = MUTATORS[rng.choice(sorted(set(MUTATORS) - {"hostile_names"}))](up, rng)
    elif rng.random() < 0.5:  # a legal but hostile name on a valid expert: committed as is
        value = rng.choice(["'; DROP TABLE experts; --", "名前 😀", '" OR 1=1 --', "%_%"])
    return replace(
        damaged, **{field_name: value}, label=f"{field_name}={value[:30]!r} {damaged.label}"
    )


def mutate(up: Upload, rng: random.Random, name: str | None = None) -> Upload:
    """One damaged upload (and, one time in five, a second mutation on top)."""
    chosen = name or rng.choice(sorted(MUTATORS))
    out = MUTATORS[chosen](up, rng)
    if name is None and rng.random() < 0.2:
        # the first damage may leave nothing for the second to parse
        unparsable = (KeyError, ValueError, IndexError, TypeError, RecursionError, struct.error)
        with contextlib.suppress(*unparsable):
            out = replace(MUTATORS[rng.choice(sorted(MUTATORS))](out, rng), label=f"{out.label} +")
    return replace(out, nonce=next(_NONCES))
