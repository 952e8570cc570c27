"""One worker on PostgreSQL vs SQLite at zero latency, and the database round trips per 1,000 rows.

    python tests/perf/bench_ledger.py [--rows 20000] [--repeats 3] [--concurrency 64]

Same machine, same invocation: each repeat runs ``capbatch run`` (a child process, exactly as a
user would) once with the run directory's SQLite ledger and once with ``--ledger postgresql://...``,
each against a fresh simulator process at zero latency with ``--rate unlimited``. The PostgreSQL
server is ``$CAPBATCH_TEST_PG_URL`` or a throw-away cluster started here (as the tests do).

Throughput is the sending phase (rows settled per second between the first and the last row
settled, read from the ledger), and the whole command's wall time (import and reports included).
Round trips are counted from outside, with strace, on one extra PostgreSQL run: every time the
driver blocks in ``poll()`` waiting for the database's answer (whole command: connect, schema
check, COPY import, claims, flushes, heartbeats, reports).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from conftest_pg import PG_URL_ENV, _bindir, _Cluster  # noqa: E402


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CAPILLARY_", "CAPBATCH_"))}
    e.update(CAPILLARY_USERNAME="demo", CAPILLARY_PASSWORD="demo", PYTHONPATH=str(REPO))
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sim(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "capbatch", "simulate", "--auto-create", "--port", str(port)],
                            cwd=workdir, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the simulator did not start")


def make_csv(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("cardNumber,cardExternalId\n")
        for i in range(n):
            fh.write(f"00{i:014d},EXT{i:08d}\n")
    return path


def fresh_database(server: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + "/" + name


def settled_span(backend: str, run_dir: Path, url: str | None) -> tuple[int, float]:
    sql = "SELECT count(*), max(settled_at) - min(settled_at) FROM {rows} WHERE state='succeeded'"
    if backend == "sqlite":
        conn = sqlite3.connect(run_dir / "ledger.sqlite")
        n, span = conn.execute(sql.format(rows="rows")).fetchone()
        conn.close()
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            n, span = conn.execute(sql.format(rows="capbatch.rows")).fetchone()
    return int(n), float(span)


def run_once(workdir: Path, csv: Path, backend: str, server: str, concurrency: int, tag: str,
             strace: Path | None = None) -> dict[str, float]:
    sim, sim_url = start_sim(workdir)
    run_dir = workdir / f"run-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "capbatch", "run", str(csv), "--base-url", sim_url, "--rate", "unlimited",
           "--concurrency", str(concurrency), "--progress", "none", "-q", "--run-dir", str(run_dir)]
    url = None
    if backend == "postgresql":
        url = fresh_database(server, f"bench_{tag}")
        cmd += ["--ledger", url, "--job", f"bench-{tag}"]   # a job per run: each run has its own simulator
    if strace:
        cmd = ["strace", "-f", "-qq", "-e", "trace=poll", "-o", str(strace), *cmd]
    try:
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - started
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(10)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} run failed ({done.returncode}): {done.stderr[-2000:]}")
    n, span = settled_span(backend, run_dir, url)
    return {"rows": n, "rows_per_s": (n - 1) / span, "wall_s": wall}


def count_round_trips(trace: Path) -> int:
    """Times the driver waited for the database's answer: poll() calls waiting for input only (the
    driver polls for output too while it sends; the event loop itself uses epoll, not poll)."""
    wait = re.compile(r"^\d+\s+poll\(\[\{fd=\d+, events=POLLIN\|POLLERR\}\]")
    return sum(1 for line in trace.read_text(errors="replace").splitlines() if wait.match(line))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()

    cluster = None
    server = os.environ.get(PG_URL_ENV)
    if not server:
        bindir = _bindir()
        if not bindir:
            sys.exit(f"no PostgreSQL: set {PG_URL_ENV} or install the server binaries")
        cluster = _Cluster(bindir)
        server = cluster.start()
    workdir = Path(tempfile.mkdtemp(prefix="capbatch-bench-ledger-"))
    try:
        csv = make_csv(workdir / "cards.csv", args.rows)
        results: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": []}
        for r in range(args.repeats):
            for backend in ("sqlite", "postgresql"):
                res = run_once(workdir, csv, backend, server, args.concurrency, f"{backend}{r}")
                results[backend].append(res)
                print(f"repeat {r + 1} {backend:<10} {res['rows_per_s']:8.0f} rows/s sending, "
                      f"{res['wall_s']:6.2f} s wall", flush=True)
        med = {b: (statistics.median(x["rows_per_s"] for x in v), statistics.median(x["wall_s"] for x in v))
               for b, v in results.items()}
        print(f"\n{args.rows} rows, zero latency, --rate unlimited, --concurrency {args.concurrency}, "
              f"median of {args.repeats}:")
        for b, (rate, wall) in med.items():
            print(f"  {b:<10} {rate:8.0f} rows/s sending  {wall:6.2f} s wall")
        print(f"  PostgreSQL / SQLite: {med['postgresql'][0] / med['sqlite'][0]:.2f}x sending, "
              f"{med['sqlite'][1] / med['postgresql'][1]:.2f}x wall")

        if shutil.which("strace"):
            trace = workdir / "strace.txt"
            run_once(workdir, csv, "postgresql", server, args.concurrency, "strace", strace=trace)
            trips = count_round_trips(trace)
            print(f"  database round trips (strace, one PostgreSQL run): {trips} for {args.rows} rows = "
                  f"{1000 * trips / args.rows:.1f} per 1,000 rows")
        else:
            print("  (strace not installed: round trips not counted)")
        print(json.dumps({"rows": args.rows, "median": med}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if cluster:
            cluster.stop()


if __name__ == "__main__":
    main()
