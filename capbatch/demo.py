"""`capbatch demo`: the whole job end to end against the built-in simulator, no credentials, no network."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from . import config, runner
from .errors import InputFileError
from .simulator import SimConfig, SimulatorThread

log = logging.getLogger("capbatch")

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
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


def run_demo(input_path: Path | None, latency: float, rate: str, progress: str) -> int:
    path = input_path or SAMPLES / "cards.csv"
    if not path.exists():
        raise InputFileError(f"demo input {path} not found", "run the demo from the project checkout, or pass --input")
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
    log.info("simulator saw %d requests: %s", stats["requests"], stats["by_status"])
    log.info("open %s in a browser for the report", run_dir / "report.html")
    log.info("demo complete: the sample's bad rows are deliberate (a real run would exit %d)",
             summary["exit_code"])
    return 0
