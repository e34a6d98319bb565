"""``batchd db``: schema migrations, run by an operator before (or instead of) letting each
process migrate at start: ``batchd db upgrade`` then start any number of processes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Database schema migrations.")

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        envvar="BATCHD_DATABASE_URL",
        help="postgresql+psycopg://user@host/db; unset: the SQLite file in --data-dir"
        " [BATCHD_DATABASE_URL].",
    ),
]
DataDir = Annotated[
    Path, typer.Option(envvar="BATCHD_DATA_DIR", help="Data dir of the SQLite default.")
]


def _open(database_url: str | None, data_dir: Path):  # type: ignore[no-untyped-def]
    from batchd.config import Settings
    from batchd.errors import DatabaseUrlError
    from batchd.store import database

    settings = Settings(data_dir=data_dir, database_url=database_url)
    try:
        return database.open_database(settings.database_url, settings.database_path)
    except DatabaseUrlError as exc:
        typer.echo(f"batchd: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def upgrade(
    database_url: DatabaseUrl = None,
    data_dir: DataDir = Path("./batchd-data"),
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply the migrations up to REVISION (default: the newest)."""
    from batchd.store import database

    engine = _open(database_url, data_dir)
    before = database.current_revision(engine)
    database.upgrade(engine, revision)
    after = database.current_revision(engine)
    typer.echo(f"database at revision {after} (was {before or 'empty'})")


@app.command()
def current(database_url: DatabaseUrl = None, data_dir: DataDir = Path("./batchd-data")) -> None:
    """Print the database's schema revision."""
    from batchd.store import database

    typer.echo(database.current_revision(_open(database_url, data_dir)) or "empty")
