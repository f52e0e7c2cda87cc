"""``python -m moerge.cli``: the ``moerge`` command run by the interpreter at hand (the demo
starts its steps so, and tests use it to run a command in a fresh process)."""

from moerge.cli import app

app()
