"""``python -m batchd.cli.main``: the same CLI as the ``batchd`` command."""

from batchd.cli.main import app

app()
