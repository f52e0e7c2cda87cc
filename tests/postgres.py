"""A throw-away PostgreSQL cluster, so tests run on the server used in production.

``PostgresCluster`` runs ``initdb`` and ``pg_ctl`` in a temp folder, listening on 127.0.0.1 only
(its unix socket stays in the temp folder), and hands out empty databases. When the tests run
as root, the server commands run as the ``postgres`` system user, because initdb refuses root.
The fixtures that expose it live in ``tests/conftest.py``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

SERVER_USER = "postgres"
SUPERUSER = "postgres"
_START_ATTEMPTS = 3

# Runs beside the tests: if the test process dies without stopping the server (killed by a
# timeout, say), stop it and remove its files. Exits by itself once the folder is gone.
_WATCHDOG = """
import os, shutil, subprocess, sys, time
parent, root, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
while os.path.exists(root):
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        subprocess.run(stop, capture_output=True, timeout=120, check=False)
        shutil.rmtree(root, ignore_errors=True)
        break
    time.sleep(0.5)
"""


def find_postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: from PATH, else the newest Debian install."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        folder = Path(on_path).resolve().parent
        if (folder / "pg_ctl").exists():
            return folder
    installed = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: [
            int(part) for part in Path(path).parent.name.split(".") if part.isdigit()
        ],
    )
    for folder_name in reversed(installed):
        folder = Path(folder_name)
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresCluster:
    """One private PostgreSQL server; ``start()``, then ``create_database()`` per test."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="moerge-pg-"))
        self.data_dir = self.root / "data"
        self.log_file = self.root / "server.log"
        self.port = 0
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.root, user=SERVER_USER, group=None)

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / program), *args]
        if self._as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        return command

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._command(program, *args), capture_output=True, text=True, timeout=120, check=False
        )

    def _stop_command(self) -> list[str]:
        data = str(self.data_dir)
        return self._command("pg_ctl", "--pgdata", data, "--mode", "immediate", "stop")

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            raise RuntimeError(
                f"PostgreSQL {what} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{log[-4000:]}"
            )

    def start(self) -> None:
        result = self._run(
            "initdb",
            "--pgdata",
            str(self.data_dir),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        self._check(result, "initdb")
        for attempt in range(_START_ATTEMPTS):
            self.port = _free_port()
            options = " ".join(
                [
                    f"-p {self.port}",
                    "-c listen_addresses=127.0.0.1",
                    f"-c unix_socket_directories={self.root}",
                    # Durability is pointless for a throw-away cluster; speed is not.
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                ]
            )
            result = self._run(
                "pg_ctl",
                "--pgdata",
                str(self.data_dir),
                "--log",
                str(self.log_file),
                "--wait",
                "--timeout",
                "60",
                "-o",
                options,
                "start",
            )
            if result.returncode == 0:
                watchdog = [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.root)]
                subprocess.Popen(
                    [*watchdog, *self._stop_command()],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # outlives a kill of the test's process group
                )
                return
            if attempt == _START_ATTEMPTS - 1:  # the port may have been taken meanwhile
                self._check(result, "start")

    def stop(self) -> None:
        """Stop the server and remove its files."""
        if self.data_dir.exists():
            subprocess.run(self._stop_command(), capture_output=True, timeout=120, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, statement: str) -> None:
        engine = create_engine(
            self.url("postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            with engine.connect() as connection:
                connection.execute(text(statement))
        finally:
            engine.dispose()

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """Create a database (a random name unless given); returns its URL.

        It is empty, or a copy of ``template``: copying a database migrated once is much
        faster than migrating every test's database.
        """
        name = name or f"test_{uuid.uuid4().hex[:16]}"
        suffix = f' TEMPLATE "{template}"' if template else ""
        self._admin(f'CREATE DATABASE "{name}"{suffix}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
