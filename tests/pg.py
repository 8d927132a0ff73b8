"""A private, throwaway PostgreSQL server for tests: initdb into a new temporary folder, pg_ctl on a free
loopback port with a random password, one database per caller, everything removed at the end. PostgreSQL
refuses to run as root, so as root the server runs as the `postgres` system user (runuser) from a folder it owns.

Fixtures: `postgres` (the server, session-scoped), `postgres_url` (a fresh database on it) and `database_url`
(runs a test twice: on a SQLite file, then on PostgreSQL). Without PostgreSQL binaries the PostgreSQL cases skip,
except under CI (env CI set), where they fail: CI must run them.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.reaper import Reaper

INSTALL_HINT = "install PostgreSQL (scripts/bootstrap.sh does: apt-get install -y postgresql)"


def find_bindir() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    """One PostgreSQL server in `root`, listening on 127.0.0.1:`port` only (no Unix socket outside `root`)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.user = "postgres" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="attune-pg-"))
        self.data = self.root / "data"
        self.password = secrets.token_hex(16)
        self.port = 0
        self._databases = 0
        self._reaper: Reaper | None = None
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _command(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", self.user, "--", *cmd] if self.user is not None else cmd

    def _run(self, *args: str) -> str:
        done = subprocess.run(self._command(*args), cwd=self.root, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-2000:]}\n{tail}")
        return done.stdout

    def start(self) -> "PrivatePostgres":
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.user is not None:
            shutil.chown(pwfile, self.user)
        pwfile.chmod(0o600)
        self._run("initdb", "-D", str(self.data), "-U", "attune", "--auth=scram-sha-256", f"--pwfile={pwfile}",
                  "-E", "UTF8", "--locale=C")
        pwfile.unlink()
        for attempt in range(3):  # another process may take the free port between the check and the bind
            self.port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", opts,
                          "-w", "-t", "120", "start")
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        stop = shlex.join(self._command("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"))
        self._reaper = Reaper(f"{stop}; rm -rf {shlex.quote(str(self.root))}")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://attune:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "attune") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        self._databases += 1
        name = f"{prefix}_{self._databases}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        from sqlalchemy import make_url

        self._admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        """One statement outside a transaction (CREATE/DROP DATABASE), on the server's postgres database."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if self._reaper is not None:
                self._reaper.cancel()


@pytest.fixture(scope="session")
def postgres():
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not installed and CI is set: {INSTALL_HINT}")
        pytest.skip(f"PostgreSQL is not installed; {INSTALL_HINT}")
    server = PrivatePostgres(bindir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture()
def postgres_url(postgres) -> str:
    """A fresh, empty database on the private server (dropped afterwards)."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty database: a SQLite file in tmp_path, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'attune.db'}"
    return request.getfixturevalue("postgres_url")
