"""Where the coordinator is and who we are: the local client config and gRPC channels.

``moerge join`` stores the coordinator address and the credential in a JSON file with mode 0600
(``$MOERGE_HOME/client.json``, default ``~/.config/moerge/client.json``). Every command takes
``--coordinator``/``--token``/``--tls-ca`` to override it, or the matching ``MOERGE_COORDINATOR``,
``MOERGE_TOKEN`` and ``MOERGE_TLS_CA`` environment variables.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

DEFAULT_COORDINATOR = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def client_home() -> Path:
    """Where the client keeps its credential and node key: ``$MOERGE_HOME``, else
    ``~/.config/moerge``."""
    return Path(os.environ.get("MOERGE_HOME") or Path.home() / ".config" / "moerge")


@dataclass
class ClientConfig:
    """What ``moerge join`` saved: the coordinator, this contributor's id, name and credential, and
    a TLS CA."""

    coordinator: str = DEFAULT_COORDINATOR
    contributor_id: str = ""
    name: str = ""
    credential: str = ""
    tls_ca: str = ""

    @classmethod
    def path(cls) -> Path:
        """The saved configuration's file, ``client.json`` under :func:`client_home`."""
        return client_home() / "client.json"

    @classmethod
    def load(cls) -> ClientConfig:
        """The saved configuration, or the defaults before any join; unknown keys of a newer client
        are skipped."""
        path = cls.path()
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    def save(self) -> Path:
        """Write with mode 0600 (the file holds a credential)."""
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return path


@dataclass
class Target:
    """A resolved coordinator address, credential and TLS root."""

    address: str
    token: str = ""
    tls_ca: str = ""

    @classmethod
    def resolve(
        cls, coordinator: str | None = None, token: str | None = None, tls_ca: str | None = None
    ) -> Target:
        """Where to connect and as whom: each of the arguments, else its ``MOERGE_*`` variable, else
        what ``moerge join`` saved."""
        saved = ClientConfig.load()
        return cls(
            address=coordinator or os.environ.get("MOERGE_COORDINATOR") or saved.coordinator,
            token=token or os.environ.get("MOERGE_TOKEN") or saved.credential,
            tls_ca=tls_ca or os.environ.get("MOERGE_TLS_CA") or saved.tls_ca,
        )

    def channel(self) -> grpc.Channel:
        """A gRPC channel to the coordinator, TLS when a CA is set."""
        if self.tls_ca:
            return grpc.secure_channel(self.address, self._credentials(), options=_OPTIONS)
        return grpc.insecure_channel(self.address, options=_OPTIONS)

    def aio_channel(self) -> grpc.aio.Channel:
        """The asyncio twin of :meth:`channel` (create it inside the running event loop)."""
        if self.tls_ca:
            return grpc.aio.secure_channel(self.address, self._credentials(), options=_OPTIONS)
        return grpc.aio.insecure_channel(self.address, options=_OPTIONS)

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(Path(self.tls_ca).read_bytes())

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The bearer-token header of every call, none without a token."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
