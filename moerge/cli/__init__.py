"""The ``moerge`` command: every command of the platform in one Typer app, one module per group.

==============  =====================================================  ==========================
group           commands                                               module
==============  =====================================================  ==========================
contributor     ``join``, ``upload``, ``my-experts``,                  :mod:`.contributor`
                ``contributor serve|node-key``
                ``train``, ``stats``, ``contribute``                   :mod:`.training`
user            ``predict``, ``route``                                 :mod:`.user`
                ``generate``                                           :mod:`.generate`
                ``evaluate``                                           :mod:`.evaluate`
                ``compose create|list``                                :mod:`.compose`
admin           ``admin experts|router|audit``                         :mod:`.admin`
                ``admin tokens|contributors|keys``                     :mod:`.admin_access`
coordinator     ``coordinator serve|health``                           :mod:`.coordinator`
==============  =====================================================  ==========================

Beside them: the options every client command shares (:mod:`.options`), tables and JSON
(:mod:`.output`), one client per command with errors as one line (:mod:`.rpc`) and what is
shown of an expert's quality and privacy (:mod:`.expert_report`). ``demo`` is
:func:`moerge.demo.demo`.

Commands are thin: the work is done by the package that owns it (training and statistics by
:mod:`moerge.contributor_client`, serving by :mod:`moerge.coordinator`, calls by
:class:`moerge.Client`). Only Typer, rich and the command modules load here: every command
imports torch, transformers, flwr or grpc itself, when it runs (``moerge --help`` and ``moerge
version`` import none of them; tests/client/test_cli_startup.py guards it).
"""

from __future__ import annotations

from typing import Annotated

import typer

from moerge.cli import admin, compose, contributor, coordinator, evaluate, generate, training, user
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
        from moerge.cli.output import quiet_libraries

        quiet_libraries()


# Groups of subcommands, then the commands, each in the order `moerge --help` lists them.
app.add_typer(coordinator.app, name="coordinator")
app.add_typer(admin.app, name="admin")
app.add_typer(compose.app, name="compose")
app.command()(contributor.join)
app.command()(contributor.upload)
app.command("my-experts")(contributor.my_experts)
app.command()(user.predict)
app.command()(user.route)
app.command()(training.train)
app.command()(training.stats)
app.command()(training.contribute)
app.add_typer(contributor.supernode_app, name="contributor")
app.command()(generate.generate)
app.command()(evaluate.evaluate)
app.command()(demo)


@app.command()
def version() -> None:
    """Print the moerge version."""
    from moerge import __version__

    typer.echo(__version__)
