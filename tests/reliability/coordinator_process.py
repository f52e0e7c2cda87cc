"""``moerge coordinator serve`` as a real child process that tests can SIGKILL and restart.

The fault tests need what an in-process server cannot give: a process that dies mid-write with
no ``finally`` blocks run, then a fresh process on the same data dir and database. Settings
travel as ``MOERGE_*`` environment variables, as in the container.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from moerge.cli.coordinator import check_health
from moerge.storage.tokens import new_token
from moerge.v1 import (
    inference_pb2,
    inference_pb2_grpc,
)
from tests.coordinator.test_server import enroll

MOERGE = str(Path(sys.executable).parent / "moerge")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def file_size_limit(max_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn``: writes that would grow any file past ``max_bytes`` fail with EFBIG.

    CPython ignores SIGXFSZ, so the write raises ``OSError(EFBIG)`` instead of killing the
    process: an injected "disk full" that needs no root and no special filesystem.
    """

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


class CoordinatorProcess:
    """One coordinator child process; ``start()`` waits until it is SERVING."""

    def __init__(
        self,
        data_dir: Path,
        base_model: Path,
        db_url: str = "",
        admin_token: str | None = None,
        log_dir: Path | None = None,
        **settings: object,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.admin_token = admin_token or new_token("mga")[1]
        self.log_dir = Path(log_dir or self.data_dir.parent / "logs")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MOERGE_")},
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "MOERGE_DATA_DIR": str(self.data_dir),
            "MOERGE_DB_URL": db_url,
            "MOERGE_ADMIN_TOKEN": self.admin_token,
            "MOERGE_BASE_MODEL": str(base_model),
            "MOERGE_BASE_MODEL_ID": "tiny-bert",
            "MOERGE_AUTO_RETRAIN": "false",
            **{f"MOERGE_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.starts = 0

    def start(
        self, timeout: float = 90, preexec_fn: Callable[[], None] | None = None
    ) -> CoordinatorProcess:
        """Start on a fresh loopback port and wait for the health service to say SERVING."""
        self.address = f"127.0.0.1:{free_port()}"
        env = {**self.env, "MOERGE_LISTEN": self.address}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = self.log_dir / f"coordinator-{self.starts}.err"
        with log.open("wb") as err:
            self.process = subprocess.Popen(
                [MOERGE, "coordinator", "serve"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=preexec_fn,
            )
        deadline = time.monotonic() + timeout
        while check_health(self.address, timeout=1) != "SERVING":
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = log.read_text(errors="replace")[-4000:]
                raise AssertionError(f"coordinator did not become healthy:\n{tail}")
            time.sleep(0.2)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_text(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("coordinator-*.err"))
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown hook, no flush, no rollback runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it does not exit in time."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> CoordinatorProcess:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def enroll(self, name: str) -> str:
        """A contributor credential, obtained as a real contributor does (token, then Join)."""
        return enroll(self.address, self.admin_token, name)[1]

    def predict(self, text: str = "the film was good") -> inference_pb2.PredictResponse:
        """One routed prediction as admin; raises ``grpc.RpcError`` on failure."""
        with grpc.insecure_channel(self.address) as channel:
            return inference_pb2_grpc.InferenceServiceStub(channel).Predict(
                inference_pb2.PredictRequest(inputs=[text]),
                metadata=bearer(self.admin_token),
                timeout=60,
            )


def replica_pair(
    root: Path, base_model: Path, db_url: str, **settings: object
) -> tuple[CoordinatorProcess, CoordinatorProcess]:
    """Replicas ``a`` and ``b`` (not started) over one database, as an operator sets them up:
    one admin token, the same settings, a data dir and log folder each under ``root``."""
    admin = new_token("mga")[1]
    first, second = (
        CoordinatorProcess(
            root / name,
            base_model,
            db_url,
            admin_token=admin,
            log_dir=root / f"logs-{name}",
            **settings,
        )
        for name in ("a", "b")
    )
    return first, second
