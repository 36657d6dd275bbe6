"""A real PostgreSQL (Debian's server binaries: initdb + pg_ctl) in a temp folder, for the tests of
``serve.store=postgres``.

It listens on 127.0.0.1 at a free port (and a unix socket in its folder), trusts local
connections, runs without fsync and starts in about a second. PostgreSQL refuses to run as root:
as root it runs as the ``postgres`` user (the package creates it) through ``runuser``. Where the
binaries are missing the tests are skipped with the reason (`.ci/run` installs the Debian package
``postgresql``).

    with PostgresServer.start() as postgres:      # or the module fixture in a test file
        postgres.dsn                               # postgresql://bindweave@127.0.0.1:PORT/bindweave
        postgres.new_database("other")             # another empty database's DSN
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from serve_process import free_port

INSTALL_HINT = "apt-get install postgresql (as root; .ci/run does this)"
USER = "bindweave"


class PostgresServer:
    def __init__(self, bin_dir: Path, folder: Path, port: int, run_as: str | None):
        self.bin_dir, self.folder, self.port, self.run_as = bin_dir, folder, port, run_as
        self.data = folder / "data"

    @classmethod
    def start(cls) -> PostgresServer:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            pytest.skip(f"no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb): {INSTALL_HINT}")
        run_as = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip(f"running as root and there is no 'postgres' user to run PostgreSQL as: {INSTALL_HINT}")
            run_as = "postgres"
        # Not under pytest's tmp_path: its parents are private to root, and the server runs as postgres.
        folder = Path(tempfile.mkdtemp(prefix="bindweave-postgres-"))
        if run_as:
            shutil.chown(folder, user=run_as)
        server = cls(Path(found[-1]).parent, folder, free_port(), run_as)
        server._run("initdb", "-D", str(server.data), "-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync",
                    "--no-instructions")
        server._run("pg_ctl", "-D", str(server.data), "-l", str(folder / "server.log"), "-w", "-t", "60", "-o",
                    f"-k {folder} -c listen_addresses=127.0.0.1 -p {server.port} -c fsync=off "
                    "-c max_connections=50", "start")
        server.new_database(USER)
        return server

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.folder)
        if result.returncode != 0:
            log = self.folder / "server.log"
            pytest.fail(f"{tool} exited {result.returncode}: {result.stderr}\n{log.read_text() if log.exists() else ''}")

    def dsn_of(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        return self.dsn_of(USER)

    def new_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn_of("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_of(name)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
