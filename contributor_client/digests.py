"""sha256 of local files, remembered so that re-uploading or resuming an expert skips re-hashing.

Hashing is the client's largest cost on a fast link (about 0.17 s for 256 MiB with SHA-NI,
`benchmarks/results/upload_throughput.md`), and ``moerge upload`` hashes every file before the
first byte goes, to derive the upload id. A digest is reused only while the file's identity and
change stamps are all unchanged: device, inode, size, ``mtime_ns`` and ``ctime_ns`` (which no
ordinary tool can set back, unlike mtime). A stale entry can at worst make the coordinator refuse
the upload ("sha256 or size does not match"), never register wrong content: it hashes every
byte it receives itself.

The cache is a JSON file in the client's home (``$MOERGE_HOME/sha256-cache.json``, mode 0600),
holding the most recent :data:`MAX_ENTRIES` files.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

MAX_ENTRIES = 256
FILE_NAME = "sha256-cache.json"


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def sha256_file(path: Path) -> str:
    """A file's SHA-256, read in 1 MiB blocks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)  # one reused buffer: no fresh memory per block
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


class DigestCache:
    """``path -> (stamp, sha256)``, loaded lazily, saved atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, tuple[list[int], str]] | None = None

    @classmethod
    def in_home(cls, home: Path) -> DigestCache | None:
        """The cache of a joined client (its home folder exists), else None."""
        return cls(home / FILE_NAME) if home.is_dir() else None

    def _load(self) -> dict[str, tuple[list[int], str]]:
        if self._entries is None:
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = {
                    str(k): ([int(x) for x in v[0]], str(v[1])) for k, v in raw.items()
                }
            except (OSError, ValueError, TypeError, KeyError, IndexError):
                self._entries = {}  # missing or damaged: start over
        return self._entries

    def sha256(self, path: Path) -> str:
        """The file's sha256, from the cache when its stamp is unchanged."""
        key = str(Path(path).resolve())
        before = _stamp(os.stat(path))
        entries = self._load()
        cached = entries.get(key)
        if cached is not None and cached[0] == before:
            return cached[1]
        digest = sha256_file(path)
        if _stamp(os.stat(path)) == before:  # not changed while being hashed
            entries.pop(key, None)
            entries[key] = (before, digest)
        return digest

    def save(self) -> None:
        """Write the newest entries (at most ``MAX_ENTRIES``) through a temporary file and an atomic
        rename, so a concurrent writer or a crash never leaves a torn file."""
        if self._entries is None:
            return
        keep = dict(list(self._entries.items())[-MAX_ENTRIES:])
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}")  # per writer
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(keep, handle)
        os.replace(tmp, self.path)
