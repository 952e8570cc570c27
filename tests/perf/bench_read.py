"""Benchmark: open_input + rows() + check_row over generated files.

Not collected by pytest. Run:  python tests/perf/bench_read.py [--keep DIR] [--root TREE] [--big 1]
Each case runs in a fresh subprocess so the peak RSS figures are separate. ``cpu s`` (user + system
time of the child) is the figure to compare on a busy machine; wall time moves with the load.
``--root TREE`` imports capbatch from another checkout (e.g. ``git archive main | tar -x -C /tmp/m``)
so a change can be compared with its base on the same files in the same minutes. ``--big 1`` adds
1.2M rows over two sheets read with ``--sheet all`` (about a minute to generate).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
