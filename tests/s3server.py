"""A real S3 API server for tests: moto's server in its own process, on 127.0.0.1, port 0.

MinIO's server cannot be installed here (no binary in the package indexes this machine can
reach), so the tests speak S3 over HTTP to moto's server (``moto[server]`` from PyPI), the same
wire protocol, signatures and multipart uploads boto3 uses against S3 or MinIO. What moto does
not do, and tests therefore cannot rely on: it accepts a part whose ``x-amz-checksum-sha256``
does not match its bytes, and a presigned PUT without the headers it signed. The coordinator
verifies every file's digest after reading it back anyway (docs/upload-protocol.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from typing import Any

from moerge.storage.blobstore_s3 import make_client

ACCESS_KEY = "moerge-test"
SECRET_KEY = "moerge-test-secret"
REGION = "us-east-1"

_SERVER = """
import sys, time
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
while True:
    time.sleep(3600)
"""


def s3_env() -> dict[str, str]:
    """Credentials boto3 reads; moto accepts any."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }


class S3Server:
    """One moto S3 server process; ``new_bucket()`` per test."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **s3_env()},
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("moto's S3 server did not start")
        self.port = int(line)
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        os.environ.update(s3_env())  # the client here and the coordinators the tests start

    def client(self) -> Any:
        return make_client(self.endpoint_url, REGION)

    def new_bucket(self) -> str:
        name = f"moerge-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()
