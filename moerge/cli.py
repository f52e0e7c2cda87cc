"""The ``moerge`` command: coordinator, admin and contributor commands in one Typer app.

Only Typer, rich and the command modules load here: every command imports torch, transformers,
flwr or grpc itself, when it runs (``moerge --help`` and ``moerge version`` import none of
them; tests/client/test_cli_startup.py guards it).
"""

from __future__ import annotations

from typing import Annotated

import typer

from moerge.contributor_client.admin_cli import app as admin_app
from moerge.contributor_client.cli import register as register_contributor_commands
from moerge.contributor_client.compose_cli import app as compose_app
from moerge.contributor_client.evaluate_cli import evaluate
from moerge.contributor_client.flower_cli import register as register_flower_commands
from moerge.contributor_client.generate_cli import generate
from moerge.coordinator.cli import app as coordinator_app
from moerge.demo import demo

app = typer.Typer(
    help="moerge: pool LoRA experts trained on private data, and route among them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            envvar="MOERGE_VERBOSE",
            help="keep the libraries' own messages (transformers load reports, progress bars, "
            "warnings)",
        ),
    ] = False,
) -> None:
    """moerge: pool LoRA experts trained on private data, and route among them."""
    if not verbose and ctx.invoked_subcommand != "coordinator":  # the server keeps its logs
        from moerge.contributor_client.output import quiet_libraries

        quiet_libraries()


app.add_typer(coordinator_app, name="coordinator")
app.add_typer(admin_app, name="admin")
app.add_typer(compose_app, name="compose")
register_contributor_commands(app)
register_flower_commands(app)
app.command()(generate)
app.command()(evaluate)
app.command()(demo)


@app.command()
def version() -> None:
    """Print the moerge version."""
    from moerge import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
