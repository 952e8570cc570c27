"""A real PostgreSQL server for the tests: the one CI started (CAPBATCH_TEST_PG_URL), or a throw-away
cluster this session starts itself (initdb + pg_ctl on a free loopback port, trust auth on
127.0.0.1 only, as a non-root user). Tests that need it are skipped, with the reason, only when no
server can be had. Each test gets a database of its own.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

PG_URL_ENV = "CAPBATCH_TEST_PG_URL"   # postgresql://USER@127.0.0.1:PORT/postgres, set by .ci/run
_counter = itertools.count(1)


def _bindir() -> str | None:
    on_path = shutil.which("initdb")
    if on_path:
        return str(Path(on_path).parent)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return str(Path(found[-1]).parent) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Cluster:
    """initdb + pg_ctl in a temporary directory, run as a non-root user when we are root."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.user = None if os.geteuid() != 0 else "postgres"
        if self.user:
            pwd.getpwnam(self.user)   # KeyError: no such user
        self.root = Path(tempfile.mkdtemp(prefix="capbatch-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.root, info.pw_uid, info.pw_gid)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(Path(self.bindir) / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)

    def start(self) -> str:
        init = self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                         "--no-instructions")
        if init.returncode:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()[-300:]}")
        (self.data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        started = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w",
                            "-t", "60", "start")
        if started.returncode:
            log = (self.root / "log").read_text(errors="replace")[-500:] if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()[-300:]} {log}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a PostgreSQL server's maintenance database (``postgres``)."""
    url = os.environ.get(PG_URL_ENV)
    if url:
        yield url
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL tests: psycopg is not installed (pip install -e '.[test]')")
    bindir = _bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL tests: no server binaries (initdb) found and {PG_URL_ENV} is not set; "
                    "install them (apt-get install postgresql) or point the variable at a server")
    try:
        cluster = _Cluster(bindir)
    except KeyError:
        pytest.skip("PostgreSQL tests: running as root and there is no 'postgres' user to start a cluster as")
    try:
        url = cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        cluster.stop()
        pytest.skip(f"PostgreSQL tests: could not start a throw-away cluster ({exc})")
    try:
        yield url
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    import psycopg

    name = f"capbatch_t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = pg_server.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
