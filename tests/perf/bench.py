"""capbatch performance benchmarks (not a test: pytest never collects this file).

    python tests/perf/bench.py [--scenarios latency,cpu,quota,resume,scale] [--quick] [--profile]

Every scenario starts the simulator in its own process (a fresh one per measurement, so the card
map starts empty every time), runs capbatch as a child process exactly as a user would, and runs a
bare aiohttp loop (64 in flight, the same PUTs and Basic auth header, no ledger) against an identical
simulator in the same invocation. Per child process, wall time, CPU seconds and peak RSS come from
os.wait4's rusage (exactly that child, not a delta of RUSAGE_CHILDREN).

Scenarios
  latency  20 ms latency, 64 in flight, 20k rows (quick: 10k), end to end: capbatch >= 0.95x bare.
  cpu      zero latency, 50k rows end to end incl. import and reports: >= 0.8x bare; CPU-s/1k rows.
           --profile adds one extra cProfile'd capbatch run (not timed) and prints the hot spots.
           Both: bare, capbatch, bare, capbatch, ... (--repeat pairs, default 3), medians reported; the
           phases show start-up (interpreter + imports), reading + validating + loading the rows, the
           sending and the reports apart, and "-read" is the ratio without the reading.
  quota    R = 600/min and 3,000/min against a simulator enforcing a strict sliding window: 60 s
           (R per any 60 s, --rate R/min; 3 min each) and 1 s (R/60 per any 1 s, --rate R/60/s, i.e.
           10/s and 50/s in the server's own unit; 60 s each), one run alone and two runs sharing the
           key (same credentials, same --quota-dir). Reports achieved/R (the requests the simulator
           accepted that arrived within the span, which starts at the first one's arrival, / (span x R)
           — a sender at exactly R scores 1.0), steady/R (the same from 10 s after the first arrival),
           the simulator's busiest window, 429s and each run's share.
           Target: >= 0.99 R, zero 429s. --quick: 75 s / 20 s spans. --quota-windows 60s|1s picks one.
  resume   1,000,000-row ledger with 999,000 settled, and the reports its interrupted run wrote: the
           last 1,000 rows (20 ms latency) end to end < 3 s, the reports' share shown apart, then a full
           rebuild of the same reports (`capbatch report --output-dir`) timed and compared byte for byte.
  scale    zero latency, 100k and 1M rows end to end: peak RSS must not grow with rows (< 400 MB).
  read     `capbatch validate` of a 100k and a 1M-row CSV (quick: 100k) against the bare stdlib csv
           parse of the same file; target 1M rows <= 3 s.
  xlsx     `capbatch validate` and `run` of a 1.2M-row two-sheet .xlsx with --sheet all (quick:
           2x50k) against calamine alone: peak RSS < 400 MB, seconds per million rows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CONCURRENCY = 64
CLK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPILLARY_", "CAPBATCH_"))}
    env.update(CAPILLARY_USERNAME="demo", CAPILLARY_PASSWORD="demo", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Child:
    """A child process whose own rusage (CPU, peak RSS) is collected with os.wait4."""

    def __init__(self, cmd: list[str], log: Path, cwd: Path) -> None:
        self.cmd = cmd
        self.log = log
        self._fh = open(log, "wb")
        self.started = time.time()
        self._mono = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=self._fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.rc: int | None = None
        self.wall = 0.0
        self.cpu = 0.0
        self.maxrss_mb = 0.0
        self.ended = 0.0

    def poll(self) -> bool:
        """True once the child has exited (and its rusage was collected)."""
        if self.rc is not None:
            return True
        pid, status, ru = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return False
        self._collect(status, ru)
        return True

    def wait(self, timeout: float | None = None, tick: Callable[[], None] | None = None,
             interval: float = 0.05) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if tick is not None:
                tick()
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.cmd[:4]} did not finish within {timeout} s; log {self.log}")
            time.sleep(interval)
        assert self.rc is not None
        return self.rc

    def signal(self, sig: int) -> None:
        if self.rc is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.rc is None:
            os.kill(self.pid, signal.SIGKILL)
            _, status, ru = os.wait4(self.pid, 0)
            self._collect(status, ru)

    def cpu_now(self) -> float:
        """CPU seconds so far, from /proc (for processes still running)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK
        except (OSError, IndexError, ValueError):
            return self.cpu

    def _collect(self, status: int, ru: Any) -> None:
        self.rc = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.rc
        self.wall = time.monotonic() - self._mono
        self.ended = time.time()
        self.cpu = ru.ru_utime + ru.ru_stime
        self.maxrss_mb = ru.ru_maxrss / 1024.0  # KiB on Linux
        self._fh.close()


class Sim:
    """`python -m capbatch.simulator` in its own process."""

    def __init__(self, workdir: Path, name: str, latency: float = 0.0, rate_per_minute: int | None = None,
                 rate_per_second: int | None = None) -> None:
        cmd = [PY, "-m", "capbatch.simulator", "--port", "0", "--auto-create", "--latency", str(latency)]
        if rate_per_minute:
            cmd += ["--rate-per-minute", str(rate_per_minute)]
        if rate_per_second:
            cmd += ["--rate-per-second", str(rate_per_second)]
        self.child = Child(cmd, workdir / f"sim-{name}.log", workdir)
        deadline = time.monotonic() + 20
        self.url = ""
        while time.monotonic() < deadline:
            text = self.child.log.read_text(errors="replace")
            if "listening on " in text:
                self.url = text.split("listening on ", 1)[1].split()[0]
                break
            if self.child.poll():
                raise RuntimeError(f"simulator exited: {text}")
            time.sleep(0.02)
        if not self.url:
            self.child.kill()
            raise RuntimeError("simulator did not start")
        self.cpu_start = self.child.cpu_now()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_sim/stats", timeout=60) as resp:
            return json.loads(resp.read())

    def requests(self) -> tuple[int, int, int]:
        """(requests, accepted, rate_limited): cheap only while few cards were touched."""
        s = self.stats()
        return s["requests"], s["accepted"], s["rate_limited"]

    def stop(self) -> dict[str, Any]:
        stats = self.stats()
        slim = {k: v for k, v in stats.items() if k not in ("puts_per_card", "applied_per_card")}
        slim["puts_total"] = sum(stats["puts_per_card"].values())
        slim["puts_per_card_keys"] = list(stats["puts_per_card"])
        slim["cards_put_more_than_once"] = sum(1 for v in stats["puts_per_card"].values() if v > 1)
        slim["sim_cpu"] = self.child.cpu_now() - self.cpu_start
        del stats
        self.child.signal(signal.SIGTERM)
        try:
            self.child.wait(timeout=20)
        except TimeoutError:
            pass
        return slim


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def card(i: int) -> str:
    return f"00{i:014d}"


def ext(i: int) -> str:
    return f"EXT{i:08d}"


def make_csv(workdir: Path, n: int) -> Path:
    path = workdir / f"cards-{n}.csv"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        fh.write("cardNumber,cardExternalId\r\n")
        step = 100_000
        for start in range(0, n, step):
            fh.write("".join(f"{card(i)},{ext(i)}\r\n" for i in range(start, min(n, start + step))))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# the bare loop (runs in a child process: `bench.py --_bare URL N`)
# ---------------------------------------------------------------------------------------------
def bare_main(url: str, n: int, concurrency: int) -> None:
    import aiohttp

    async def go() -> dict[str, Any]:
        digest = hashlib.md5(b"demo").hexdigest()
        auth = "Basic " + base64.b64encode(f"demo:{digest}".encode()).decode()
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        put_url = url.rstrip("/") + "/v2/card?format=json"
        statuses: dict[int, int] = {}
        first = last = 0.0
        rows = iter(range(n))
        connector = aiohttp.TCPConnector(limit=concurrency + 4)
        async with aiohttp.ClientSession(connector=connector,
                                         headers={"User-Agent": "bare/1", "Accept": "application/json"}) as session:
            async def worker() -> None:
                nonlocal first, last
                for i in rows:
                    body = json.dumps({"cardNumber": card(i), "cardExternalId": ext(i)}).encode()
                    async with session.put(put_url, data=body, headers=headers) as resp:
                        await resp.read()
                        st = resp.status
                    statuses[st] = statuses.get(st, 0) + 1
                    now = time.time()
                    if not first:
                        first = now
                    last = now

            t0 = time.time()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            t1 = time.time()
        return {"loop_seconds": t1 - t0, "first": first, "last": last,
                "statuses": {str(k): v for k, v in statuses.items()}}

    print("BARE " + json.dumps(asyncio.run(go())), flush=True)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
RESULTS: list[dict[str, Any]] = []
NOTES: list[str] = []


def record(**row: Any) -> dict[str, Any]:
    row.setdefault("load", os.getloadavg()[0])
    RESULTS.append(row)
    return row


def run_bare(workdir: Path, name: str, n: int, latency: float) -> dict[str, Any]:
    sim = Sim(workdir, f"{name}-bare", latency=latency)
    try:
        child = Child([PY, str(Path(__file__).resolve()), "--_bare", sim.url, str(n), str(CONCURRENCY)],
                      workdir / f"{name}-bare.log", workdir)
        child.wait(timeout=3600)
    finally:
        stats = sim.stop()
    text = child.log.read_text()
    data = json.loads(text.split("BARE ", 1)[1].splitlines()[0]) if "BARE " in text else {}
    if child.rc != 0 or not data:
        raise RuntimeError(f"bare loop failed (rc {child.rc}): {text[-2000:]}")
    send = max(data["last"] - data["first"], 1e-9)
    non200 = sum(v for k, v in data["statuses"].items() if k != "200")
    return {"rows": n, "wall": child.wall, "cpu": child.cpu, "rss": child.maxrss_mb,
            "send_s": send, "send_rate": (n - 1) / send, "loop_s": data["loop_seconds"],
            "non200": non200, "n429": stats["by_status"].get("429", 0), "sim_cpu": stats["sim_cpu"]}


def ledger_phases(run_dir: Path) -> dict[str, float]:
    """Wall-clock marks from the ledger of a finished run (time.time() values)."""
    conn = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        imported = conn.execute("SELECT value FROM meta WHERE key='imported_at'").fetchone()
        inv = conn.execute("SELECT started_at, ended_at, requests FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        first, last, n = conn.execute(
            "SELECT min(settled_at), max(settled_at), count(*) FROM rows WHERE settled_at >= ?",
            (inv[0],)).fetchone()
        counts = dict(conn.execute("SELECT state, count(*) FROM rows GROUP BY state").fetchall())
    finally:
        conn.close()
    return {"imported_at": float(imported[0]) if imported else 0.0, "inv_start": inv[0], "inv_end": inv[1] or 0.0,
            "requests": inv[2] or 0, "first_settle": first or 0.0, "last_settle": last or 0.0,
            "settled_here": n, "counts": counts}


def run_capbatch(workdir: Path, name: str, csv_path: Path, n_send: int, sim: Sim, run_dir: Path,
                 rate: str = "unlimited", prefix: list[str] | None = None, tick: Callable[[Child], None] | None = None,
                 interval: float = 0.05, timeout: float = 7200) -> tuple[Child, dict[str, Any]]:
    cmd = (prefix or [PY]) + ["-m", "capbatch", "run", str(csv_path), "--base-url", sim.url, "--rate", rate,
                              "--concurrency", str(CONCURRENCY), "--progress", "none", "-q",
                              "--run-dir", str(run_dir)]
    child = Child(cmd, workdir / f"{name}-capbatch.log", workdir)
    child.wait(timeout=timeout, tick=(lambda: tick(child)) if tick else None, interval=interval)
    return child, {}


def capbatch_row(name: str, child: Child, sim_stats: dict[str, Any], run_dir: Path, n_send: int,
                 bare: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    if child.rc not in (0,):
        NOTES.append(f"{name}: capbatch exited {child.rc}; log {child.log}: "
                     f"{child.log.read_text(errors='replace')[-600:]}")
    ph = ledger_phases(run_dir)
    send = max(ph["last_settle"] - ph["first_settle"], 1e-9)
    send_rate = (ph["settled_here"] - 1) / send if ph["settled_here"] > 1 else 0.0
    rate = n_send / child.wall
    startup = startup_seconds()
    # reading + validating + loading the rows: process start to the import's end, less start-up
    read = ph["imported_at"] - child.started - startup if ph["imported_at"] > child.started else None
    row = {
        "scenario": name, "rows": n_send, "seconds": child.wall, "rows_s": rate,
        "ratio": (rate / (bare["rows"] / bare["wall"])) if bare else None,
        "read_s": read,
        "ratio_no_read": (n_send / (child.wall - read) / (bare["rows"] / bare["wall"])) if bare and read else None,
        "send_rate": send_rate,
        "send_ratio": (send_rate / bare["send_rate"]) if bare else None,
        "n429": sim_stats["by_status"].get("429", 0),
        "cpu_per_1k": child.cpu / n_send * 1000, "rss": child.maxrss_mb, "rc": child.rc,
        "sim_cpu_util": sim_stats["sim_cpu"] / child.wall,
        "phases": {
            "start-up (interpreter + imports)": startup,
            "read+validate+load": read,
            "start->imported": ph["imported_at"] - child.started if ph["imported_at"] > child.started else None,
            "start->invocation": ph["inv_start"] - child.started,
            "invocation->first settle": ph["first_settle"] - ph["inv_start"],
            "send (first->last settle)": send,
            "last settle->engine end": ph["inv_end"] - ph["last_settle"],
            "engine end->exit (reports)": child.ended - ph["inv_end"],
        },
        "requests_sim": sim_stats["requests"], "puts_sim": sim_stats["puts_total"],
        "dup_puts": sim_stats["cards_put_more_than_once"], "counts": ph["counts"],
    }
    if extra:
        row.update(extra)
    return record(**row)


_STARTUP: list[float] = []


def startup_seconds() -> float:
    """Interpreter start and the imports a run needs (median of 3, measured once per invocation)."""
    if not _STARTUP:
        times = []
        for _ in range(3):
            t = time.monotonic()
            subprocess.run([PY, "-c", "import capbatch.cli, capbatch.runner, capbatch.engine, capbatch.api, "
                                      "capbatch.report"], check=True, env=child_env())
            times.append(time.monotonic() - t)
        _STARTUP.append(sorted(times)[1])
        NOTES.append(f"start-up (python -c 'import capbatch.cli, .runner, .engine, .api, .report'): "
                     f"{', '.join(f'{x:.2f}' for x in times)} s, median {_STARTUP[0]:.2f} s")
    return _STARTUP[0]


def bare_row(name: str, b: dict[str, Any]) -> dict[str, Any]:
    return record(scenario=f"{name} [bare]", rows=b["rows"], seconds=b["wall"], rows_s=b["rows"] / b["wall"],
                  ratio=1.0, send_rate=b["send_rate"], send_ratio=1.0, n429=b["n429"],
                  cpu_per_1k=b["cpu"] / b["rows"] * 1000, rss=b["rss"], rc=0,
                  sim_cpu_util=b["sim_cpu"] / b["wall"])


def throughput_scenario(workdir: Path, name: str, n: int, latency: float, repeats: int) -> None:
    """bare, capbatch, bare, capbatch, ... (interleaved against drift in machine load); medians reported."""
    csv_path = make_csv(workdir, n)
    bares: list[dict[str, Any]] = []
    runs: list[tuple[Child, dict[str, Any], Path]] = []
    for k in range(repeats):
        bares.append(run_bare(workdir, f"{name}-{k}", n, latency))
        sim = Sim(workdir, f"{name}-{k}", latency=latency)
        run_dir = fresh_dir(workdir / f"run-{name}-{k}")
        try:
            child, _ = run_capbatch(workdir, f"{name}-{k}", csv_path, n, sim, run_dir)
        finally:
            stats = sim.stop()
        runs.append((child, stats, run_dir))
        print(f"  {name} #{k + 1}: bare {n / bares[-1]['wall']:.0f} rows/s, capbatch {n / child.wall:.0f} rows/s "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    bare = _median(bares, lambda b: b["rows"] / b["wall"])
    child, stats, run_dir = _median(runs, lambda r: n / r[0].wall)
    b = bare_row(name, bare)
    c = capbatch_row(name, child, stats, run_dir, n, bare)
    if repeats > 1:
        b["note"] = ("median of %d; end-to-end rows/s seen: %s" %
                     (repeats, ", ".join(f"{x['rows'] / x['wall']:.0f}" for x in bares)))
        best_bare = max(x["rows"] / x["wall"] for x in bares)
        best_cap = max(n / r[0].wall for r in runs)
        c["best_ratio"] = best_cap / best_bare
        c["note"] = ("median of %d; end-to-end rows/s seen: %s; CPU-s/1k seen: %s; best-of-%d ratio %.3f "
                     "(interference from other load only ever slows a run down)" %
                     (repeats, ", ".join(f"{n / r[0].wall:.0f}" for r in runs),
                      ", ".join(f"{r[0].cpu / n * 1000:.3f}" for r in runs), repeats, c["best_ratio"]))
    _print_last(2)


def _median(items: list[Any], key: Callable[[Any], float]) -> Any:
    ordered = sorted(items, key=key)
    return ordered[(len(ordered) - 1) // 2]


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


# ---- latency / cpu -----------------------------------------------------------------------------
def scenario_latency(workdir: Path, quick: bool, args: argparse.Namespace) -> None:
    throughput_scenario(workdir, "latency20ms", 10_000 if quick else 20_000, 0.02, args.repeat or (1 if quick else 3))


def scenario_cpu(workdir: Path, quick: bool, args: argparse.Namespace) -> None:
    n = 20_000 if quick else 50_000
    throughput_scenario(workdir, "cpu0ms", n, 0.0, args.repeat or (1 if quick else 3))
    if args.profile:
        profile_run(workdir, n)


def profile_run(workdir: Path, n: int) -> None:
    import pstats

    csv_path = make_csv(workdir, n)
    sim = Sim(workdir, "profile", latency=0.0)
    run_dir = fresh_dir(workdir / "run-profile")
    prof = workdir / "capbatch.prof"
    try:
        child, _ = run_capbatch(workdir, "profile", csv_path, n, sim, run_dir,
                                prefix=[PY, "-m", "cProfile", "-o", str(prof)])
    finally:
        sim.stop()
    print(f"\n== cProfile of capbatch, {n} rows, zero latency (wall {child.wall:.1f} s under the profiler, "
          f"rc {child.rc}); raw profile: {prof}")
    st = pstats.Stats(str(prof))
    st.sort_stats("cumulative").print_stats(40)
    st.sort_stats("tottime").print_stats(40)


# ---- quota --------------------------------------------------------------------------------------
QUOTA_RATES = (600, 3000)            # per minute
QUOTA_LATENCY = 0.02
QUOTA_STEADY_FROM = 10.0             # steady/R counts from this long after the first arrival


def make_csv_from(workdir: Path, n: int, start: int) -> Path:
    """n rows whose cards start at ``start`` (a second run's input must not share cards with the first)."""
    if start == 0:
        return make_csv(workdir, n)
    path = workdir / f"cards-{n}-from-{start}.csv"
    if not path.exists():
        with open(path, "w", newline="", encoding="utf-8") as fh:
            fh.write("cardNumber,cardExternalId\r\n")
            fh.write("".join(f"{card(i)},{ext(i)}\r\n" for i in range(start, start + n)))
    return path


def quota_run(workdir: Path, r: int, window: str, runs: int, duration: float) -> dict[str, Any]:
    """``runs`` capbatch processes on one key (one quota dir, same credentials, same simulator) for
    ``duration`` seconds against a simulator enforcing a strict sliding window of ``window``:
    '60s' = R per any 60 s (``--rate R/min``); '1s' = R/60 per any 1 s (``--rate R/60/s``, the rate in the
    server's own unit)."""
    per_s = r // 60
    name = f"quota{r}-{window}-x{runs}"
    if window == "60s":
        sim = Sim(workdir, name, latency=QUOTA_LATENCY, rate_per_minute=r)
        rate_flag, limit = f"{r}/min", r
    else:
        sim = Sim(workdir, name, latency=QUOTA_LATENCY, rate_per_second=per_s)
        rate_flag, limit = f"{per_s}/s", per_s
    quota_dir = fresh_dir(workdir / f"quota-dir-{name}")
    n = int(r / 60 * duration * 1.3 / runs) + 200
    children: list[Child] = []
    run_dirs: list[Path] = []
    try:
        for k in range(runs):
            csv_path = make_csv_from(workdir, n, k * 10_000_000)
            run_dir = fresh_dir(workdir / f"run-{name}-{k}")
            run_dirs.append(run_dir)
            cmd = [PY, "-m", "capbatch", "run", str(csv_path), "--base-url", sim.url, "--rate", rate_flag,
                   "--concurrency", str(CONCURRENCY), "--progress", "none", "-q", "--run-dir", str(run_dir),
                   "--quota-dir", str(quota_dir)]
            children.append(Child(cmd, workdir / f"{name}-{k}-capbatch.log", workdir))
        marks: dict[str, Any] = {}
        while True:
            now = time.time()
            if "t0" not in marks:
                first = sim.stats()["first_accepted_at"]
                if first is not None:
                    marks["t0"] = first
            elif "mid" not in marks and now >= marks["t0"] + QUOTA_STEADY_FROM:
                marks["mid"] = accepted_by(sim.stats(), marks["t0"] + QUOTA_STEADY_FROM)
            elif "end" not in marks and now >= marks["t0"] + duration:
                stats_end = sim.stats()
                marks["end"] = accepted_by(stats_end, marks["t0"] + duration)
                marks["limited"], marks["end_at"] = stats_end["rate_limited"], now
                for c in children:
                    c.signal(signal.SIGTERM)       # the measured span is over
            if all(c.poll() for c in children):
                break
            if "end" in marks and now - marks["end_at"] > 60:
                for c in children:
                    c.kill()
            time.sleep(0.02)
    finally:
        for c in children:
            if c.rc is None:
                c.kill()
        stats = sim.stop()
    if "end" not in marks:
        raise RuntimeError(f"{name}: capbatch ended before the {duration:.0f} s span closed "
                           f"(rc {[c.rc for c in children]}); logs {[str(c.log) for c in children]}")
    acc, limited, span = marks["end"], marks["limited"], duration
    steady = (acc - marks["mid"]) / (duration - QUOTA_STEADY_FROM)
    shares = []
    for k in range(runs):
        lo, hi = k * 10_000_000, k * 10_000_000 + n
        shares.append(sum(1 for c in stats_cards(stats) if lo <= int(c) < hi))
    busiest = stats["peak_per_minute"] if window == "60s" else stats["peak_per_second"]
    return {"name": name, "r": r, "window": window, "runs": runs, "rate_flag": rate_flag, "limit": limit,
            "seconds": span, "accepted": acc, "achieved": acc / span / (r / 60), "steady": steady / (r / 60),
            "busiest": busiest, "n429": stats["rate_limited"], "n429_span": limited, "shares": shares,
            "rcs": [c.rc for c in children], "load": os.getloadavg()[0]}


def accepted_by(stats: dict[str, Any], at: float) -> int:
    """Accepted requests that arrived (the simulator's kernel timestamp) before ``at``, from stats
    taken within a second after it."""
    recent = stats["last_second_arrivals"]
    if recent and min(recent) > at:
        raise RuntimeError(f"the simulator's stats came {time.time() - at:.1f} s after the mark: "
                           "its last second of arrivals no longer reaches back to it")
    return stats["accepted"] - sum(1 for t in recent if t >= at)


def stats_cards(stats: dict[str, Any]) -> list[str]:
    return list(stats.get("puts_per_card_keys") or [])


def scenario_quota(workdir: Path, quick: bool, args: argparse.Namespace) -> None:
    windows = [w.strip() for w in (args.quota_windows or "60s,1s").split(",") if w.strip()]
    print(QUOTA_HEADER, flush=True)
    for window in windows:
        duration = float(args.quota_seconds or ((75 if quick else 180) if window == "60s" else (20 if quick else 60)))
        for r in QUOTA_RATES:
            for runs in (1, 2):
                row = quota_run(workdir, r, window, runs, duration)
                QUOTA_RESULTS.append(row)
                print(_quota_line(row), flush=True)


QUOTA_RESULTS: list[dict[str, Any]] = []
QUOTA_HEADER = (f"{'quota':<26} {'--rate':>9} {'runs':>4} {'seconds':>7} {'accepted':>8} {'achieved/R':>10} "
                f"{'steady/R':>8} {'busiest window':>16} {'429s':>5} {'shares':>13} {'load':>5}")


def _quota_line(q: dict[str, Any]) -> str:
    label = f"R={q['r']}/min, {'sliding 60 s' if q['window'] == '60s' else 'sliding 1 s'}"
    busiest = f"{q['busiest']}/{q['limit']} ({q['busiest'] / q['limit']:.3f})"
    shares = "/".join(str(x) for x in q["shares"]) if q["runs"] > 1 else "-"
    return (f"{label:<26} {q['rate_flag']:>9} {q['runs']:>4} {q['seconds']:7.1f} {q['accepted']:>8} "
            f"{q['achieved']:10.4f} {q['steady']:8.4f} {busiest:>16} {q['n429']:>5} {shares:>13} {q['load']:5.2f}")


# ---- resume -------------------------------------------------------------------------------------
RESUME_TOTAL = 1_000_000
RESUME_LEFT = 1_000


def build_resume_template(workdir: Path, total: int, left: int) -> tuple[Path, Path]:
    """A run directory as an interrupted run leaves it: ``total - left`` rows settled, and the reports
    that run wrote at its end (so a resume can rewrite only what it changes)."""
    csv_path = make_csv(workdir, total)
    template = workdir / f"resume-template-{total}-{left}-v3"
    if (template / "ledger.sqlite").exists() and (template / "READY").exists():
        return csv_path, template
    fresh_dir(template)
    code = (
        "import os,sys\nfrom pathlib import Path\nfrom capbatch import config, runner\n"
        "s = config.resolve({'input': Path(sys.argv[1]), 'run_dir': Path(sys.argv[2])}, os.environ)\n"
        "p = runner.prepare(s)\nprint(p.ledger.counts())\np.ledger.close()\n"
    )
    t = time.monotonic()
    subprocess.run([PY, "-c", code, str(csv_path), str(template)], check=True, env=child_env(), cwd=workdir)
    import_s = time.monotonic() - t
    conn = sqlite3.connect(template / "ledger.sqlite", isolation_level=None)
    now = time.time() - 3600
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE rows SET state='succeeded', attempts=1, http_status=200, card_id=id, "
                 # latencies spread as a real run's are (10,000 distinct values at 0.01 ms): the
                 # reports index keeps them per chunk, so identical ones would flatter a resume
                 "customer_id=100000+id, latency_ms=15.0 + ((id * 7919) % 10000) / 100.0, "
                 "settled_at=? + id * 0.0001 "
                 "WHERE id <= ? AND state='pending'", (now, total - left))
    conn.execute("INSERT INTO runs(pid, started_at, ended_at, exit_code, outcome, requests) "
                 "VALUES (1, ?, ?, 130, 'interrupted', ?)", (now, now + 1000, total - left))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = dict(conn.execute("SELECT state, count(*) FROM rows GROUP BY state").fetchall())
    conn.close()
    (template / ".lock").unlink(missing_ok=True)
    t_report = time.monotonic()
    subprocess.run([PY, "-m", "capbatch", "report", str(template)], check=True, env=child_env(), cwd=workdir,
                   stdout=subprocess.DEVNULL)
    report_s = time.monotonic() - t_report
    (template / "READY").write_text(json.dumps(counts))
    NOTES.append(f"resume: built the {total}-row template ledger in {time.monotonic() - t:.1f} s "
                 f"(import {import_s:.1f} s, the interrupted run's reports {report_s:.1f} s); counts {counts}")
    return csv_path, template


def full_report_rebuild(workdir: Path, run_dir: Path) -> tuple[float, float, list[str]]:
    """`capbatch report RUN_DIR --output-dir FRESH`: every report rebuilt from the ledger. Returns (wall s,
    CPU s, the report files whose content differs from the run's own, timestamps aside)."""
    out = fresh_dir(workdir / "resume-full-rebuild")
    child = Child([PY, "-m", "capbatch", "report", str(run_dir), "--output-dir", str(out)],
                  workdir / "resume-full-rebuild.log", workdir)
    child.wait(timeout=3600)
    differ = []
    for name in ("results.csv", "failures.csv"):
        if (out / name).read_bytes() != (run_dir / name).read_bytes():
            differ.append(name)
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, out))
    ours.pop("this_invocation", None)       # the run's own summary says what this invocation did
    if ours != theirs:
        differ.append("summary.json")
    return child.wall, child.cpu, differ


def scenario_resume(workdir: Path, quick: bool, args: argparse.Namespace) -> None:
    total = 200_000 if quick else RESUME_TOTAL
    left = RESUME_LEFT
    latency = 0.02
    csv_path, template = build_resume_template(workdir, total, left)
    bare = run_bare(workdir, "resume", left, latency)
    bare_row(f"resume {left} left", bare)
    run_dir = fresh_dir(workdir / "run-resume")
    shutil.copytree(template, run_dir)
    (run_dir / "READY").unlink()
    sim = Sim(workdir, "resume", latency=latency)
    marks: dict[str, float] = {}

    def tick(child: Child) -> None:
        if "first" in marks and "last" in marks:
            return
        req = sim.requests()[0]
        now = time.time()
        if req and "first" not in marks:
            marks["first"] = now
        if req >= left and "last" not in marks:   # the PUTs (no extra read before them)
            marks["last"] = now

    try:
        child, _ = run_capbatch(workdir, "resume", csv_path, left, sim, run_dir, tick=tick, interval=0.005)
    finally:
        stats = sim.stop()
    ttfr = marks.get("first", float("nan")) - child.started
    row = capbatch_row(f"resume {total // 1000}k, {left} left", child, stats, run_dir, left, bare)
    rebuild_wall, rebuild_cpu, differ = full_report_rebuild(workdir, run_dir)
    row["reports_s"] = row["phases"]["engine end->exit (reports)"]
    row["full_rebuild_s"] = rebuild_wall
    row["note"] = (f"end to end {child.wall:.2f} s (target < 3 s), of which the reports {row['reports_s']:.2f} s; "
                   f"time to first request (simulator side, 5 ms polling) {ttfr:.2f} s; "
                   f"first->last request {marks.get('last', float('nan')) - marks.get('first', float('nan')):.2f} s; "
                   f"a full rebuild of the same reports (capbatch report --output-dir) {rebuild_wall:.2f} s "
                   f"({rebuild_cpu:.2f} CPU-s), content {'identical' if not differ else 'DIFFERS: ' + ', '.join(differ)}; "
                   f"ledger pending/in_flight left: {row['counts'].get('pending', 0)}/"
                   f"{row['counts'].get('in_flight', 0)}")
    row["ttfr"] = ttfr
    _print_last(2)


# ---- scale --------------------------------------------------------------------------------------
def scenario_scale(workdir: Path, quick: bool, args: argparse.Namespace) -> None:
    sizes = [int(x) for x in args.scale_rows.split(",")] if args.scale_rows else (
        [20_000, 100_000] if quick else [100_000, 1_000_000])
    for n in sizes:
        name = f"scale{n // 1000}k"
        csv_path = make_csv(workdir, n)
        bare = None
        if n <= args.scale_bare_max:
            bare = run_bare(workdir, name, n, 0.0)
            bare_row(name, bare)
        sim = Sim(workdir, name, latency=0.0)
        run_dir = fresh_dir(workdir / f"run-{name}")
        try:
            child, _ = run_capbatch(workdir, name, csv_path, n, sim, run_dir)
        finally:
            stats = sim.stop()
        capbatch_row(name, child, stats, run_dir, n, bare)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        _print_last(2 if bare else 1)


# ---- read / xlsx (issue 16 items 4 and 1): the rows come from bench_read.py -----------------------
def scenario_read(workdir: Path, quick: bool, args: argparse.Namespace, kind: str = "read") -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_read

    for row in bench_read.scenario_rows(kind, workdir, quick, Child, Sim):
        record(**row)
        _print_last(1)


def scenario_xlsx(workdir: Path, quick: bool, args: argparse.Namespace) -> None:
    scenario_read(workdir, quick, args, kind="xlsx")


SCENARIOS: dict[str, Callable[[Path, bool, argparse.Namespace], None]] = {
    "latency": scenario_latency, "cpu": scenario_cpu, "quota": scenario_quota,
    "resume": scenario_resume, "scale": scenario_scale, "read": scenario_read, "xlsx": scenario_xlsx,
}


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _f(v: Any, fmt: str) -> str:
    if v is None:
        width = fmt.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(v, fmt)


HEADER = (f"{'scenario':<34} {'rows':>9} {'seconds':>8} {'rows/s':>8} {'ratio':>6} {'-read':>6} {'send/s':>8} "
          f"{'s.ratio':>7} {'429s':>5} {'CPUs/1k':>8} {'RSS MB':>7} {'simCPU':>6} {'rc':>4} {'load':>5}")


def _line(r: dict[str, Any]) -> str:
    return (f"{r['scenario']:<34} {r['rows']:>9} {_f(r['seconds'], '8.2f')} {_f(r['rows_s'], '8.1f')} "
            f"{_f(r['ratio'], '6.3f')} {_f(r.get('ratio_no_read'), '6.3f')} {_f(r['send_rate'], '8.1f')} "
            f"{_f(r['send_ratio'], '7.3f')} "
            f"{r['n429']:>5} {_f(r['cpu_per_1k'], '8.3f')} {_f(r['rss'], '7.1f')} "
            f"{_f(r['sim_cpu_util'], '6.2f')} {r['rc']:>4} {_f(r.get('load'), '5.2f')}")


def _print_last(k: int) -> None:
    for r in RESULTS[-k:]:
        print(_line(r), flush=True)
        if "phases" in r:
            print("    phases: " + ", ".join(f"{k} {_f(v, '.2f')}s" for k, v in r["phases"].items()), flush=True)
        if r.get("note"):
            print("    " + r["note"], flush=True)


def print_table() -> None:
    print()
    print(f"capbatch benchmark  {dt.datetime.now().isoformat(timespec='seconds')}  cores={os.cpu_count()}  "
          f"python {sys.version.split()[0]}  concurrency={CONCURRENCY}")
    print("rows/s and ratio: end to end (process start to exit, incl. import and reports for capbatch; "
          "process start to exit for bare). -read: the same ratio without capbatch's reading + validating + "
          "loading of the rows (process start to the import's end, less the start-up). send/s, s.ratio: "
          "first->last settled row only.")
    print("quota rows: rows = accepted requests in the window, ratio = achieved/R, s.ratio = steady-state/R. "
          "simCPU = simulator CPU-s per wall-s (1.0 = simulator saturated one core). "
          "load = 1-min load average after the measurement (other tenants share this machine).")
    print(HEADER)
    print("-" * len(HEADER))
    for r in RESULTS:
        print(_line(r))
    for r in RESULTS:
        if r.get("note"):
            print(f"  {r['scenario']}: {r['note']}")
    for n in NOTES:
        print("  note: " + n)
    if QUOTA_RESULTS:
        print()
        print("quota: achieved/R = accepted requests that arrived (simulator's kernel timestamps) within "
              "[first arrival, first arrival + seconds) / (seconds x R); steady/R = the same from first arrival "
              f"+ {QUOTA_STEADY_FROM:g} s; busiest window = the simulator's own busiest sliding window "
              "(count/limit); shares = requests per run (whole run).")
        print(QUOTA_HEADER)
        print("-" * len(QUOTA_HEADER))
        for q in QUOTA_RESULTS:
            print(_quota_line(q))


def compile_package() -> None:
    """Byte-compile capbatch once, as installing the package does: a source checkout run with
    PYTHONDONTWRITEBYTECODE=1 (this machine's default) would otherwise compile every module at every
    start, a cost the bare loop's site-packages imports never pay."""
    import compileall

    compileall.compile_dir(str(REPO / "capbatch"), quiet=1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_bare":
        bare_main(argv[1], int(argv[2]), int(argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="latency,cpu,quota,resume,scale",
                   help="comma-separated: " + ",".join(SCENARIOS))
    p.add_argument("--quick", action="store_true", help="smaller inputs, short quota windows")
    p.add_argument("--profile", action="store_true", help="cpu: add one cProfile'd capbatch run")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/capbatch-bench"),
                   help="inputs are cached here between invocations")
    p.add_argument("--scale-rows", help="comma-separated row counts for the scale scenario")
    p.add_argument("--scale-bare-max", type=int, default=100_000,
                   help="scale: run the bare loop only up to this many rows")
    p.add_argument("--repeat", type=int, help="latency/cpu: interleaved repeats, median reported "
                   "(default 3, quick 1)")
    p.add_argument("--keep", action="store_true", help="keep large run directories")
    p.add_argument("--quota-windows", help="quota: comma-separated server windows to test (60s,1s)")
    p.add_argument("--quota-seconds", type=float, help="quota: measured span per run (default 180/60, quick 75/20)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios: {', '.join(unknown)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    compile_package()
    print(HEADER, flush=True)
    for name in names:
        try:
            SCENARIOS[name](args.workdir, args.quick, args)
        except Exception as exc:  # keep going: report what failed
            NOTES.append(f"{name}: FAILED: {exc.__class__.__name__}: {exc}")
            print(f"!! {name} failed: {exc}", flush=True)
    print_table()
    if args.json:
        args.json.write_text(json.dumps({"results": RESULTS, "quota": QUOTA_RESULTS, "notes": NOTES}, indent=2,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
