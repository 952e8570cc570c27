"""`capbatch demo`: the whole job end to end against the built-in simulator, no credentials, no network."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from . import config, runner
from .errors import InputFileError
from .wording import plural
from .simulator import SimConfig, SimulatorThread

log = logging.getLogger("capbatch")

SAMPLES = Path(__file__).resolve().parent.parent / "samples"   # the project checkout (editable installs)
PACKAGED_SAMPLE = Path(__file__).resolve().parent / "data" / "cards.csv"   # shipped in the wheel
DEMO_UNKNOWN_PREFIX = "999"   # sample cards starting with this are not seeded: they fail with 3010


def _sample_cards(path: Path) -> dict[str, str | None]:
    """Seed the simulator with the sample's card numbers (read exactly, as the run will read them)."""
    from .source import InputOptions, open_input

    table = open_input(path, InputOptions())
    cards: dict[str, str | None] = {}
    for row in table.rows():
        card = row.card.strip()
        if card and not card.startswith(DEMO_UNKNOWN_PREFIX):
            cards[card] = None
    return cards


def default_sample() -> Path:
    """The sample shipped inside the package (a regular install), else the checkout's samples/."""
    return PACKAGED_SAMPLE if PACKAGED_SAMPLE.exists() else SAMPLES / "cards.csv"


def run_demo(input_path: Path | None, latency: float, rate: str, progress: str) -> int:
    path = input_path or default_sample()
    if not path.exists():
        raise InputFileError(f"demo input {path} not found",
                             "pass --input FILE, or reinstall capbatch (the sample ships with the package)")
    cfg = SimConfig(cards=_sample_cards(path), latency=latency, jitter=latency / 2, seed=7)
    run_dir = Path("reports") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    with SimulatorThread(cfg) as sim:
        log.info("simulator listening on %s (demo credentials)", sim.url)
        env = dict(os.environ, CAPILLARY_USERNAME=cfg.username, CAPILLARY_PASSWORD=cfg.password)
        env.pop("CAPILLARY_CLIENT_KEY", None)
        env.pop("CAPILLARY_CLIENT_SECRET", None)
        settings = config.resolve({"input": path, "base_url": sim.url, "run_dir": run_dir, "rate": rate,
                                   "progress": progress}, env)
        summary = runner.run(settings)
        stats = sim.stats()
    by_status = ", ".join(f"{n} × HTTP {code}" for code, n in sorted(stats["by_status"].items()))
    log.info("simulator saw %s: %s", plural(stats["requests"], "request"), by_status or "none")
    log.info("open %s in a browser for the report", run_dir / "report.html")
    log.info("demo complete: the sample's bad rows are deliberate (a real run would exit %d)",
             summary["exit_code"])
    return 0
