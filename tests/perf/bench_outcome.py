"""What the outcome checks cost in requests (not a test: pytest never collects this file).

    python tests/perf/bench_outcome.py [--rows 1000] [--canary 5]

Runs the real CLI against the simulator (same process, loopback) on a clean file, once with the
canary (as on a real target) and once without, and counts the requests the simulator saw per route.
In a clean run the answer checks cost nothing; the canary costs its K reads. For contrast it also
runs the modes where the checks do spend requests: answers that contradict the request (one read per
such row) and --read-back (one read per row).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from capbatch.simulator import SimConfig, SimulatorThread


def run_case(name: str, rows: int, flags: list[str], **sim: object) -> None:
    pairs = [(f"00{i:014d}", f"EXT{i:08d}") for i in range(rows)]
    with tempfile.TemporaryDirectory(prefix="capbatch-bench-outcome-") as tmp:
        src = Path(tmp) / "cards.csv"
        with open(src, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["cardNumber", "cardExternalId"])
            w.writerows(pairs)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPILLARY_", "CAPBATCH_"))}
        env.update(CAPILLARY_USERNAME="demo", CAPILLARY_PASSWORD="demo",
                   PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
        with SimulatorThread(SimConfig(cards={c: None for c, _ in pairs}, **sim)) as s:  # type: ignore[arg-type]
            started = time.monotonic()
            p = subprocess.run([sys.executable, "-m", "capbatch", "run", str(src), "--base-url", s.url,
                                "--run-dir", str(Path(tmp) / "run"), "--rate", "unlimited", "--progress", "none",
                                "-q", *flags], env=env, capture_output=True, text=True, check=False)
            took = time.monotonic() - started
            st = s.stats()
    routes = st["by_route"]
    puts, gets = routes["PUT /v2/card"], routes["GET /v2/card"]
    extra = st["requests"] - rows
    print(f"{name:<44} exit {p.returncode}  PUT {puts:>6}  GET {gets:>6}  extra requests {extra:>5} "
          f"= {1000.0 * extra / rows:7.1f} per 1,000 rows  ({took:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--canary", type=int, default=5)
    a = ap.parse_args()
    run_case(f"clean, --canary {a.canary} (a real target's default)", a.rows, ["--canary", str(a.canary)])
    run_case("clean, no canary (loopback default)", a.rows, [])
    run_case("10 % of answers name another ID (applied)", a.rows, [], p_echo_other=0.1, seed=1)
    run_case("clean, --read-back", a.rows, ["--read-back"])


if __name__ == "__main__":
    main()
