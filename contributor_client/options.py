"""Command-line options every client command shares (where the coordinator is, who we are)."""

from __future__ import annotations

from typing import Annotated

import typer

Coordinator = Annotated[str | None, typer.Option("--coordinator", "-c", help="HOST:PORT")]
Token = Annotated[str | None, typer.Option("--token", help="credential (or MOERGE_TOKEN)")]
TlsCa = Annotated[str | None, typer.Option("--tls-ca", help="CA certificate (PEM) for TLS")]
Json = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
