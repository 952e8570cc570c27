"""Shared fixtures: a real simulator on loopback, the real CLI in a subprocess, generated inputs."""

from __future__ import annotations

import csv
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from capbatch.simulator import SimConfig, SimulatorThread
from conftest_pg import pg_server, pg_url  # noqa: F401  (fixtures: a real PostgreSQL server)

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile capbatch once for the session. The suite starts the CLI ~270 times; where
    PYTHONDONTWRITEBYTECODE is set (this machine, CI) an editable install has no .pyc files, so every
    start compiled capbatch's modules from source again: ~0.5-1 s of each CLI start under load.
    (Python validates each .pyc against its source's mtime and size, so an edit is never missed.)"""
    import compileall

    import capbatch

    compileall.compile_dir(Path(capbatch.__file__).parent, quiet=2)


def make_cards(n: int, start: int = 0) -> list[tuple[str, str]]:
    """n (card, external id) pairs; card numbers carry leading zeros on purpose."""
    return [(f"00{i + start:014d}", f"EXT{i + start:08d}") for i in range(n)]


def write_csv(path: Path, pairs: list[tuple[str, str]], header: tuple[str, str] = ("cardNumber", "cardExternalId"),
              extra_rows: list[list[str]] | None = None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for card, ext in pairs:
            w.writerow([card, ext])
        for row in extra_rows or []:
            w.writerow(row)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def ledger_query(run_dir: Path, sql: str) -> list[sqlite3.Row]:
    """Read a run's ledger the way `capbatch status` does: read-only, safe while a run writes."""
    conn = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def ledger_rows(run_dir: Path) -> list[sqlite3.Row]:
    return ledger_query(run_dir, "SELECT * FROM rows ORDER BY id")


@pytest.fixture
def sim() -> Iterator[Callable[..., SimulatorThread]]:
    """Factory: ``sim(cards=..., latency=...)`` starts a SimulatorThread, stopped after the test."""
    started: list[SimulatorThread] = []

    def start(**config: Any) -> SimulatorThread:
        thread = SimulatorThread(SimConfig(**config)).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPILLARY_", "CAPBATCH_"))}
    env.update(CAPILLARY_USERNAME="demo", CAPILLARY_PASSWORD="demo", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m capbatch ARGS`` in tmp_path (not a terminal), returning the completed process."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "capbatch", *map(str, args)], cwd=cwd or tmp_path,
                              env=env or cli_env(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    return run


def popen_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "capbatch", *map(str, args)], cwd=cwd, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
