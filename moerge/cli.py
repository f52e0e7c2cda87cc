"""The ``moerge`` command: coordinator, admin and contributor commands in one Typer app."""

from __future__ import annotations

import typer

from moerge.contributor_client.admin_cli import app as admin_app
from moerge.contributor_client.cli import register as register_contributor_commands
from moerge.contributor_client.flower_cli import register as register_flower_commands
from moerge.contributor_client.generate_cli import generate
from moerge.coordinator.cli import app as coordinator_app
from moerge.demo import demo

app = typer.Typer(
    help="moerge: pool LoRA experts trained on private data, and route among them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(admin_app, name="admin")
register_contributor_commands(app)
register_flower_commands(app)
app.command()(generate)
app.command()(demo)


@app.command()
def version() -> None:
    """Print the moerge version."""
    from moerge import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
