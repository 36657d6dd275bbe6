"""The two SQL databases a job table can live in, behind one small interface (``serve.store``).

- :class:`SqliteDatabase` (``serve.store=sqlite``, the default): ``<state_dir>/jobs.sqlite3`` (WAL),
  one server.
- :class:`PostgresDatabase` (``serve.store=postgres``): a PostgreSQL database shared by many
  replicas (psycopg 3); rows are claimed with ``FOR UPDATE SKIP LOCKED``.

What differs between them is here and only here: connecting, a transaction, the tables' DDL (and
the upgrades of older tables), the row-locking clause of a claim, and how a transaction keeps
other servers out (``serialize``). Every statement the job store runs is written once, in
:mod:`bindweave.serve.store`, with ``?`` placeholders; :class:`Statements` runs it on either.

    with database.transaction() as db:
        database.serialize(db)                     # one such transaction at a time, on every replica
        db.rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bindweave.errors import BindWeaveInputError

# The columns of schema version 1 (store.SCHEMA_VERSION), in order; the types are each database's.
_JOBS_COLUMNS = """
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,                  -- the validated request (JSON), what the worker runs
    created_at {time} NOT NULL,
    started_at {time},
    finished_at {time},
    phase TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    num_steps INTEGER NOT NULL DEFAULT 0,
    progress {time} NOT NULL DEFAULT 0,
    error_code TEXT,
    error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,    -- starts; a crash loop is stopped at serve.max_attempts
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker TEXT,                            -- the replica running it (serve.replica_id)
    lease_expires {time}                    -- it renews this while it runs; past it, another replica may take over
"""
_VERSION_TABLE = "CREATE TABLE schema_version (version INTEGER NOT NULL)"


class Statements:
    """One open transaction (or autocommit connection): statements with ``?`` placeholders."""

    def __init__(self, cursor, placeholder: str):
        self._cursor, self._placeholder = cursor, placeholder

    def rows(self, sql: str, args: tuple = ()) -> list[dict]:
        """The rows of a query (or of ``... RETURNING``), each a dict of column -> value."""
        self._execute(sql, args)
        if self._cursor.description is None:
            return []
        names = [column[0] for column in self._cursor.description]
        return [dict(zip(names, row)) for row in self._cursor.fetchall()]

    def run(self, sql: str, args: tuple = ()) -> int:
        """A change: the number of rows it touched."""
        self._execute(sql, args)
        return self._cursor.rowcount

    def _execute(self, sql: str, args: tuple) -> None:
        self._cursor.execute(sql if self._placeholder == "?" else sql.replace("?", self._placeholder), args)


class SqliteDatabase:
    """One server's table in one file (thread-safe: one connection behind a lock)."""

    name = "sqlite"
    shared = False  # no other server opens it: what a dead server left running is interrupted at start-up
    claim_lock = ""  # BEGIN IMMEDIATE already makes every write transaction exclusive
    create = (f"CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT,{_JOBS_COLUMNS.format(time='REAL')})",
              _VERSION_TABLE)
    # Version 0: the table of the servers before schema versions (no lease columns, no version table).
    upgrades = {0: ("ALTER TABLE jobs ADD COLUMN worker TEXT", "ALTER TABLE jobs ADD COLUMN lease_expires REAL",
                    _VERSION_TABLE)}

    def __init__(self, path: Path):
        self.where = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")

    @contextmanager
    def transaction(self) -> Iterator[Statements]:
        """One write transaction, taken at once: the reads in it see what it will change."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Statements(self._db.cursor(), "?")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return Statements(self._db.cursor(), "?").rows(sql, args)

    def serialize(self, db: Statements) -> None:
        """Nothing to add: BEGIN IMMEDIATE is exclusive already."""

    def tables(self, db: Statements) -> set[str]:
        return {row["name"] for row in db.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresDatabase:
    """A table that many replicas share (one connection per replica, behind a lock)."""

    name = "postgres"
    shared = True  # other replicas run jobs from it: only an expired lease marks a job as interrupted
    claim_lock = " FOR UPDATE SKIP LOCKED"  # two replicas claiming at once take different jobs, neither waits
    create = (f"CREATE TABLE jobs (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
              f"{_JOBS_COLUMNS.format(time='DOUBLE PRECISION')})",
              "CREATE INDEX jobs_queue ON jobs (status, seq)", _VERSION_TABLE)
    upgrades: dict[int, tuple[str, ...]] = {}
    # Any constant: the advisory lock that queue-bound checks and schema changes of all replicas share.
    LOCK_KEY = 0x42696E64

    def __init__(self, dsn: str):
        import psycopg

        self._lock = threading.Lock()
        try:
            self._db = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as error:
            raise BindWeaveInputError(f"cannot connect to PostgreSQL (serve.postgres_dsn): "
                                      f"{str(error).strip().splitlines()[0]}") from None
        info = self._db.info
        self.where = f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"  # no password

    @contextmanager
    def transaction(self) -> Iterator[Statements]:
        with self._lock, self._db.transaction(), self._db.cursor() as cursor:
            yield Statements(cursor, "%s")

    def query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock, self._db.cursor() as cursor:
            return Statements(cursor, "%s").rows(sql, args)

    def serialize(self, db: Statements) -> None:
        """Held until the transaction ends; every replica's such transactions run one after another."""
        db.rows("SELECT pg_advisory_xact_lock(?)", (self.LOCK_KEY,))

    def tables(self, db: Statements) -> set[str]:
        return {row["table_name"] for row in db.rows(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_database(store: str, state_dir: Path, dsn: str | None, dsn_env: str):
    """``serve.store``'s database: the SQLite file in ``state_dir``, or PostgreSQL at
    ``serve.postgres_dsn`` (else the variable ``dsn_env``, which keeps a password off the command line)."""
    if store == "sqlite":
        return SqliteDatabase(state_dir / "jobs.sqlite3")
    dsn = dsn or os.environ.get(dsn_env)
    if not dsn:
        raise BindWeaveInputError(f"serve.store=postgres needs a database: set {dsn_env}="
                                  "'postgresql://USER:PASSWORD@HOST:5432/DBNAME' (or serve.postgres_dsn=...)")
    return PostgresDatabase(dsn)
