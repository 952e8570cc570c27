"""Benchmark: open_input + rows() + check_row over generated files.

Also the `read` and `xlsx` scenarios of tests/perf/bench.py (scenario_rows: the CLI end to end).

Not collected by pytest. Run:  python tests/perf/bench_read.py [--keep DIR] [--root TREE] [--big 1]
Each case runs in a fresh subprocess so the peak RSS figures are separate. ``cpu s`` (user + system
time of the child) is the figure to compare on a busy machine; wall time moves with the load.
``--root TREE`` imports capbatch from another checkout (e.g. ``git archive main | tar -x -C /tmp/m``)
so a change can be compared with its base on the same files in the same minutes. ``--big 1`` adds
1.2M rows over two sheets read with ``--sheet all`` (about a minute to generate).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def gen_csv(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("Card Number,cardExternalId,Name,City,Notes\r\n")
        f.writelines(f"{i:016d},EXT{i:010d},Customer {i},Zürich,\"a, quoted note\"\r\n" for i in range(n))


def gen_xlsx(path: Path, n: int) -> None:
    import openpyxl

    wb = openpyxl.Workbook(write_only=True)
    ws = wb.create_sheet("Cards")
    ws.append(["cardNumber", "cardExternalId", "Name", "Amount"])
    for i in range(n):
        ws.append([f"{i:016d}", f"EXT{i:010d}", f"Customer {i}", i * 1.5])
    wb.save(path)


def gen_xlsx_numbers(path: Path, n: int, sheets: int = 1) -> None:
    """Card numbers typed as numbers and shown zero-padded: the reader must render the format."""
    import xlsxwriter

    wb = xlsxwriter.Workbook(str(path), {"constant_memory": True})
    padded = wb.add_format({"num_format": "0000000000000000"})
    k = 0
    for s in range(sheets):
        ws = wb.add_worksheet("Cards" if sheets == 1 else f"Part {s + 1}")
        ws.write_row(0, 0, ["cardNumber", "cardExternalId", "Name", "Amount"])
        for i in range(n):
            ws.write_number(i + 1, 0, 4_000_000 + k, padded)
            ws.write_string(i + 1, 1, f"EXT{k:010d}")
            ws.write_string(i + 1, 2, f"Customer {k}")
            ws.write_number(i + 1, 3, k * 1.5)
            k += 1
    wb.close()


def run_case(path: str, root: str) -> dict:
    """Child process: time the whole read+check and report peak RSS."""
    import resource

    sys.path.insert(0, root)
    from capbatch.rules import RuleSettings, check_row
    from capbatch.source import InputOptions, open_input

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    settings = RuleSettings()
    t0 = time.perf_counter()
    table = open_input(path, InputOptions(sheet="all") if "2x" in Path(path).name else InputOptions())
    t_open = time.perf_counter() - t0
    ok = bad = 0
    for row in table.rows():
        if check_row(row, settings).reason_code is None:
            ok += 1
        else:
            bad += 1
    total = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss
    return {
        "open_s": round(t_open, 2),
        "total_s": round(total, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "rows": ok + bad,
        "rejected": bad,
        "peak_rss_mb": round(peak / 1024, 1),
        "rss_before_mb": round(base / 1024, 1),
    }


# ---- bench.py's `read` and `xlsx` scenarios ----------------------------------------------------
_BARE_CSV = ("import csv, io, sys\n"
             "from itertools import islice\n"
             "with open(sys.argv[1], 'rb') as raw:\n"
             "    r = csv.reader(io.TextIOWrapper(raw, encoding='utf-8', newline=''), strict=True)\n"
             "    n = 0\n"
             "    while recs := list(islice(r, 10_000)): n += len(recs)\n")
_BARE_XLSX = ("import sys, python_calamine as pc\n"
              "book = pc.CalamineWorkbook.from_path(sys.argv[1])\n"
              "for name in book.sheet_names:\n"
              "    sheet = book.get_sheet_by_name(name)\n"
              "    n = sum(1 for _ in sheet.iter_rows())\n"
              "    del sheet\n")


def scenario_rows(kind: str, workdir: Path, quick: bool, child: Any, sim: Any) -> Iterator[dict]:
    """Rows for bench.py's table (``child``, ``sim``: bench.py's Child and Sim). ``read``: `capbatch validate` of a CSV (100k; 1M unless quick) against the bare
    stdlib csv parse of the same file. ``xlsx``: `capbatch validate` and `capbatch run` (simulator, zero
    latency, unlimited rate) of a two-sheet workbook read with --sheet all (2x600k; quick 2x50k)
    against calamine loading and iterating its sheets alone. ratio = bare seconds / capbatch seconds."""
    d = workdir / "read"
    d.mkdir(parents=True, exist_ok=True)
    if kind == "read":
        cases = [(n, d / f"{n // 1000}k.csv", lambda p, n=n: gen_csv(p, n), _BARE_CSV, [])
                 for n in ([100_000] if quick else [100_000, 1_000_000])]
    else:
        per = 50_000 if quick else 600_000
        cases = [(2 * per, d / f"2x{per // 1000}k.xlsx", lambda p: gen_xlsx_numbers(p, per, 2), _BARE_XLSX,
                  ["--sheet", "all"])]
    py = sys.executable
    for n, path, gen, bare_code, extra in cases:
        if not path.exists():
            gen(path)
        label = f"{kind} {path.name}"
        bare = child([py, "-c", bare_code, str(path)], d / f"{path.stem}-bare.log", d)
        bare.wait(timeout=3600)
        yield _row(f"{label} [bare parse]", n, bare, None, "")
        v = child([py, "-m", "capbatch", "validate", str(path), *extra, "-o", str(d / f"{path.stem}.validation.csv")],
                  d / f"{path.stem}-validate.log", d)
        v.wait(timeout=3600)
        yield _row(f"{label} validate", n, v, bare, f"{v.wall / n * 1e6:.2f} s per million rows wall, "
                   f"{v.cpu / n * 1e6:.2f} CPU-s per million rows")
        if kind == "xlsx":
            s = sim(d, path.stem, latency=0.0)
            run_dir = d / f"run-{path.stem}"
            shutil.rmtree(run_dir, ignore_errors=True)
            try:  # bench.py's run_capbatch command, with the input options
                r = child([py, "-m", "capbatch", "run", str(path), *extra, "--base-url", s.url, "--rate", "unlimited",
                           "--concurrency", "64", "--progress", "none", "-q", "--run-dir", str(run_dir)],
                          d / f"{path.stem}-run.log", d)
                r.wait(timeout=7200)
            finally:
                stats = s.stop()
            if stats.get("puts_total") != n:
                r.rc = r.rc or -2
                print(f"!! the simulator saw {stats.get('puts_total')} PUTs for {n} rows", flush=True)
            loaded = _imported_at(run_dir) - r.started
            shutil.rmtree(run_dir, ignore_errors=True)
            yield _row(f"{label} run", n, r, None, f"{r.wall / n * 1e6:.2f} s per million rows end to end "
                       f"(read, check, load, send, reports); start -> rows loaded in the ledger {loaded:.2f} s "
                       f"({loaded / n * 1e6:.2f} s per million rows)")


def _imported_at(run_dir: Path) -> float:
    import sqlite3

    conn = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='imported_at'").fetchone()
    finally:
        conn.close()
    return float(row[0]) if row else float("nan")


def _row(name: str, n: int, c: Any, bare: Any, note: str) -> dict:
    rc = c.rc if c.rc is not None else -1
    if rc != 0:
        note = f"exit {rc}; log {c.log}. " + note
    return {"scenario": name, "rows": n, "seconds": c.wall, "rows_s": n / c.wall if c.wall else None,
            "ratio": bare.wall / c.wall if bare is not None and c.wall else None, "send_rate": None,
            "send_ratio": None, "n429": 0, "cpu_per_1k": c.cpu / n * 1000, "rss": c.maxrss_mb,
            "sim_cpu_util": None, "rc": rc, "note": note}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(run_case(sys.argv[2], sys.argv[3])))
        return
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    keep = args.get("--keep")
    root = str(Path(args.get("--root", ROOT)).resolve())
    tmp_ctx = tempfile.TemporaryDirectory() if keep is None else None
    d = Path(keep or tmp_ctx.name)  # type: ignore[union-attr]
    d.mkdir(parents=True, exist_ok=True)
    cases = [
        ("csv 100k", d / "100k.csv", lambda p: gen_csv(p, 100_000)),
        ("csv 1M", d / "1m.csv", lambda p: gen_csv(p, 1_000_000)),
        ("xlsx 200k", d / "200k.xlsx", lambda p: gen_xlsx(p, 200_000)),
        ("xlsx 200k numbers", d / "200k-numbers.xlsx", lambda p: gen_xlsx_numbers(p, 200_000)),
    ]
    if args.get("--big"):
        cases.append(("xlsx 2x600k all", d / "2x600k.xlsx", lambda p: gen_xlsx_numbers(p, 600_000, 2)))
    print(f"capbatch from {root}")
    print(f"{'case':<18} {'size MB':>8} {'open s':>7} {'total s':>8} {'cpu s':>6} {'rows':>9} {'peak RSS MB':>12}")
    for name, path, gen in cases:
        if not path.exists():
            gen(path)
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(path), root], capture_output=True, text=True
        )
        if out.returncode != 0:
            print(name, "FAILED", out.stderr[-2000:])
            continue
        r = json.loads(out.stdout)
        size = path.stat().st_size / 1e6
        print(
            f"{name:<18} {size:>8.1f} {r['open_s']:>7} {r['total_s']:>8} {r['cpu_s']:>6} {r['rows']:>9} "
            f"{r['peak_rss_mb']:>12}"
        )
    if tmp_ctx is not None:
        tmp_ctx.cleanup()


if __name__ == "__main__":
    main()
