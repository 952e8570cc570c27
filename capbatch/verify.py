"""Read-only checks against the API: ``capbatch verify`` and ``run --dry-run --check-remote``.

Every card is read (``GET /v2/card``) through the same pacer and retry rules as a run, and compared
with the external ID it should carry. Nothing is written to the API or to any ledger. The reads take
their turns on the quota shared with every run on the key (capbatch.quota: this host's quota files,
or the ledger database's), so a verify beside a nightly run on the same key keeps both within it.
"""

from __future__ import annotations

import asyncio
import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .aio import run_async
from .api import CARD_NOT_FOUND, CapillaryClient, Kind, Outcome
from .config import Credentials, Rate
from .errors import ConfigError
from .pacing import Pacer, SharedQuota, backoff_delay
from .report import atomic_write, neutralise

log = logging.getLogger("capbatch.verify")

PAGE = 2000


@dataclass(frozen=True)
class CheckSettings:
    """What the read-only checks use of a run's settings (runner.check_settings builds it)."""

    credentials: Credentials
    rate: Rate | None = None
    read_rate: Rate | None = None
    concurrency: int = 16
    max_attempts: int = 8
    timeout: float = 30.0
    verify_tls: bool = True
    quota_dir: Path | None = None
    priority: int = 1


@dataclass(frozen=True, slots=True)
class Target:
    label: str          # "12" or "Sheet1!12": where the row is in the user's file
    card: str
    intended: str


@dataclass(frozen=True, slots=True)
class Check:
    target: Target
    status: str          # "match" | "differs" | "missing" | "error"
    actual: str | None
    message: str = ""


async def _read_one(client: CapillaryClient, pacer: Pacer, target: Target, max_attempts: int) -> Check:
    outcome: Outcome | None = None
    for attempt in range(1, max_attempts + 1):
        await pacer.acquire()
        outcome = await client.get_card(target.card)
        pacer.answered(outcome.throttled, outcome.retry_after)
        if outcome.kind is Kind.FATAL:
            # credentials refused, 403, not the Capillary API, TLS: a setting to fix. Nothing was written,
            # so there is nothing to resume (exit 3 belongs to a run that stopped resumably).
            raise ConfigError(f"check stopped: {outcome.error_message}",
                              "fix the credentials or the target (--cluster/--base-url) and rerun")
        if outcome.kind is not Kind.RETRY:
            break
        await asyncio.sleep(max(backoff_delay(attempt), min(outcome.retry_after or 0.0, 300.0)))
    assert outcome is not None
    if outcome.ok:
        actual = outcome.external_id
        status = "match" if actual == target.intended else "differs"
        return Check(target, status, actual)
    if outcome.error_code == str(CARD_NOT_FOUND):
        return Check(target, "missing", None, outcome.error_message or "card number does not exist")
    return Check(target, "error", None, f"{outcome.error_code}: {outcome.error_message}")


async def _check_all(s: CheckSettings, base_url: str, targets: Iterable[Target], sink: Callable[[Check], None],
                     database: str | None) -> None:
    """Read in pages (memory stays flat), handing each page's checks to ``sink`` in input order."""
    quota = SharedQuota(s.rate, s.read_rate, target=base_url, credentials=s.credentials, quota_dir=s.quota_dir,
                        priority=s.priority, database=database)
    try:
        await _read_pages(s, base_url, targets, sink, quota.read_pacer)
    finally:
        await quota.close()


async def _read_pages(s: CheckSettings, base_url: str, targets: Iterable[Target], sink: Callable[[Check], None],
                      pacer: Pacer) -> None:
    sem = asyncio.Semaphore(s.concurrency)
    async with CapillaryClient(base_url, s.credentials, timeout=s.timeout, verify_tls=s.verify_tls,
                               max_connections=s.concurrency + 4) as client:

        async def guarded(t: Target) -> Check:
            async with sem:
                return await _read_one(client, pacer, t, s.max_attempts)

        page: list[Target] = []
        for t in targets:
            page.append(t)
            if len(page) >= PAGE:
                for check in await asyncio.gather(*(guarded(x) for x in page)):
                    sink(check)
                page = []
        if page:
            for check in await asyncio.gather(*(guarded(x) for x in page)):
                sink(check)


def check_cards(s: CheckSettings, base_url: str, targets: Iterable[Target], out_csv: Path,
                database: str | None = None) -> dict[str, int]:
    """Read every target card; write ``out_csv`` (row, card, intended, actual, status, message).
    ``database``: the ledger database whose quota the reads share; None: this host's quota files."""
    counts = {"match": 0, "differs": 0, "missing": 0, "error": 0}

    def write(fh: Any) -> None:
        w = csv.writer(fh)
        w.writerow(["row", "cardNumber", "intended_external_id", "actual_external_id", "status", "message"])

        def sink(c: Check) -> None:
            counts[c.status] += 1
            w.writerow([c.target.label, neutralise(c.target.card), neutralise(c.target.intended),
                        neutralise(c.actual or ""), c.status, neutralise(c.message)])
            if c.status != "match" and counts[c.status] <= 10:
                found = c.actual or ("no external ID" if c.status == "differs" else "-")
                log.warning("row %s: card %s %s (intended %s, found %s)%s", c.target.label, c.target.card,
                            c.status, c.target.intended, found, f" {c.message}" if c.message else "")

        run_async(_check_all(s, base_url, targets, sink, database))

    atomic_write(out_csv, write)
    return counts
