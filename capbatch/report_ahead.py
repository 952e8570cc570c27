"""Reports ahead of the end: while a run sends, a helper process keeps a copy of results.csv and
failures.csv (and their index, see report_rows) up to date with the ledger, so the reports written at
the end format only the rows settled since its last pass instead of every row.

The helper is a separate process (the run's event loop keeps its core; the machine's other core
formats), niced below the run, reading the SQLite ledger through a read-only connection. It writes
only into ``<run_dir>/.reports-ahead/``, never the reports themselves: the run stops it with SIGKILL at
any instant and then writes the real reports from that copy when its index still describes its files
(report_rows checks sizes and times), from the previous reports otherwise. Its copy is removed after.
A run killed with kill -9 leaves the helper to notice its closed pipe within a second and exit.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .ledger import CHUNK_BITS, Ledger

STAGING_DIR = ".reports-ahead"
# Below this many rows to send the end's own write costs less than starting a helper process.
MIN_ROWS = 100_000
PASS_EVERY = 1.0      # seconds between passes (a pass only when rows changed since the last one)


class ReportsAhead:
    """The helper process of one run; :meth:`stop` it before writing the reports."""

    def __init__(self, run_dir: Path, proc: subprocess.Popen[bytes]) -> None:
        self.staging = run_dir / STAGING_DIR
        self._proc = proc

    @classmethod
    def start(cls, ledger: Ledger, run_dir: Path, rows_to_send: int) -> "ReportsAhead | None":
        """The helper for a run directory's SQLite ledger with at least MIN_ROWS rows to send, else None."""
        shutil.rmtree(run_dir / STAGING_DIR, ignore_errors=True)   # a killed run's copy: stale, and not kept
        if ledger.backend != "sqlite" or rows_to_send < MIN_ROWS:
            return None
        try:
            proc = subprocess.Popen([sys.executable, "-m", "capbatch.report_ahead", str(run_dir)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, close_fds=True)
        except OSError:
            return None      # the end writes every report itself, as without the helper
        return cls(run_dir, proc)

    def stop(self) -> Path:
        """End the helper wherever it is; returns the directory of its copy."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        return self.staging

    def discard(self) -> None:
        self.stop()
        shutil.rmtree(self.staging, ignore_errors=True)


def _parent_gone(timeout: float) -> bool:
    """Wait up to ``timeout`` s; True once the run closed our stdin (it ended, or was killed)."""
    ready, _, _ = select.select([sys.stdin.buffer], [], [], timeout)
    return bool(ready) and not os.read(sys.stdin.fileno(), 1)


def main(argv: list[str]) -> int:
    from .ledger import SqliteLedger
    from .report_rows import write_row_reports

    run_dir = Path(argv[0])
    staging = run_dir / STAGING_DIR
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C is the run's to handle; it stops us
    os.nice(10)
    done = 0
    while not _parent_gone(PASS_EVERY):
        ledger = SqliteLedger.open_readonly(run_dir)
        try:
            # A pass once another chunk of rows is wholly settled: that chunk will not change again,
            # while a pass over chunks still being sent is formatted again by the next one.
            settled = _settled_chunks(ledger)
            if settled > done:
                # the first pass starts from the run directory's reports (a resumed run has them)
                write_row_reports(ledger, staging, None if done else run_dir).commit()
                done = settled
        finally:
            ledger.close()
    return 0


def _settled_chunks(ledger: Ledger) -> int:
    """How many chunks from the first one hold no row still to send (pending or in flight)."""
    waiting = [row.id for row in ledger.pending_page(0, 1)] + [row.id for row in ledger.unknown_rows()[:1]]
    first = min(waiting) if waiting else ledger.last_id() + 1
    return first >> CHUNK_BITS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
