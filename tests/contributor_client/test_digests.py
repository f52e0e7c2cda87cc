"""The client's sha256 cache: reused only for an unchanged file, never trusted after a change."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moerge.contributor_client.digests import FILE_NAME, DigestCache


def test_a_cached_digest_is_reused_until_the_file_changes(tmp_path: Path) -> None:
    data = tmp_path / "weights.bin"
    data.write_bytes(b"a" * 10_000)
    cache = DigestCache(tmp_path / FILE_NAME)
    real = hashlib.sha256(b"a" * 10_000).hexdigest()
    assert cache.sha256(data) == real
    cache.save()
    assert oct((tmp_path / FILE_NAME).stat().st_mode & 0o777) == "0o600"

    # Plant a different digest: a fresh cache object that returns it has not re-hashed.
    raw = json.loads((tmp_path / FILE_NAME).read_text())
    (key,) = raw
    raw[key][1] = "0" * 64
    (tmp_path / FILE_NAME).write_text(json.dumps(raw))
    assert DigestCache(tmp_path / FILE_NAME).sha256(data) == "0" * 64

    # Same size, mtime set back: the ctime still moved, so the file is hashed again.
    stat = data.stat()
    data.write_bytes(b"b" * 10_000)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (
        DigestCache(tmp_path / FILE_NAME).sha256(data) == hashlib.sha256(b"b" * 10_000).hexdigest()
    )


def test_a_damaged_cache_file_is_ignored(tmp_path: Path) -> None:
    data = tmp_path / "weights.bin"
    data.write_bytes(b"x")
    (tmp_path / FILE_NAME).write_text("{not json")
    cache = DigestCache(tmp_path / FILE_NAME)
    assert cache.sha256(data) == hashlib.sha256(b"x").hexdigest()
    cache.save()
    assert len(json.loads((tmp_path / FILE_NAME).read_text())) == 1
