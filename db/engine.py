"""Engine and session helpers: SQLite in WAL mode, foreign keys on, busy timeout."""

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

from db.models import Base
from db.settings import get_settings

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000


def _use_wal(cursor, timeout_s: float) -> None:
    """Switch the database file to WAL mode, which then stays with the file.

    The switch needs the database to itself, and SQLite answers "database is
    locked" at once, without waiting, when several processes open a new
    file together; so it is retried here until `timeout_s` has passed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            if mode.lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_settings(busy_timeout_ms: int):
    def configure(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        _use_wal(cursor, busy_timeout_ms / 1000)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return configure


def create_db_engine(url: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Engine:
    """Create an engine for `url` and the tables it lacks.

    `busy_timeout_ms` is how long a write waits for another writer.

    Raises:
        ValueError: if the URL is not a SQLite URL.
    """
    if not url.startswith("sqlite"):
        raise ValueError(f"DATABASE_URL={url!r} is not supported: use a sqlite:/// URL")
    database = url.split("///", 1)[-1]
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
    )
    event.listen(engine, "connect", _sqlite_settings(busy_timeout_ms))
    _create_schema(engine)
    return engine


def _create_schema(engine: Engine) -> None:
    """Create the tables and columns the database lacks, one process at a time.

    Several processes can open a new database at once (the dashboard, a CLI
    command, job workers). Without the write lock taken first, each sees no
    tables and all but one fail with "table ... already exists".
    """
    with engine.connect() as connection:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        Base.metadata.create_all(connection)
        _add_missing_columns(connection)
        connection.commit()


def _add_missing_columns(connection: Connection) -> None:
    """Bring a database made by an older version up to date.

    Columns added since are nullable, so `ALTER TABLE ... ADD COLUMN` is all
    an existing database needs; its rows keep every value they had.
    """
    existing = inspect(connection)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise RuntimeError(
                    f"database {connection.engine.url} lacks column {table.name}."
                    f"{column.name}, which cannot be added in place; "
                    "move the database aside and import again"
                )
            kind = column.type.compile(dialect=connection.dialect)
            connection.execute(
                text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
            )
            logger.info("added column %s.%s", table.name, column.name)


@lru_cache(maxsize=8)
def _cached_engine(url: str) -> Engine:
    return create_db_engine(url)


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for `url` (default: the settings' DATABASE_URL)."""
    return _cached_engine(url or get_settings().database_url)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    factory = sessionmaker(bind=engine or get_engine(), expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
