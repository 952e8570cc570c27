"""The canary: prove the API's contract on a few real rows before the worker pool spends the quota.

Capillary's documentation leaves open what a PUT does (which card it touches, which fields are
mandatory, how failures look). Before the pool opens on a real target, K rows spread across the file
are sent one at a time and each card is read back. The run goes on only if every answer was of a
kind capbatch knows, no answer contradicted its request, and every card the API said it updated
really holds its new ID. Otherwise the run stops (exit 3) with what was sent, what came back and
what the card holds: exactly what Capillary support needs to see. The rows the canary settled stay
settled; the rest stay pending for the rerun.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Protocol

from .api import (
    CONTRADICTS,
    DOCUMENTED_STATUS,
    NO_ECHO,
    NOT_APPLIED,
    UNCONFIRMED,
    CapillaryClient,
    Kind,
    Outcome,
    is_known_code,
)
from .errors import LedgerError
from .ledger import Ledger, RowResult, State, WorkRow, row_label
from .wording import plural

log = logging.getLogger("capbatch.canary")

BODY_SHOWN = 600   # characters of an answer's body quoted in the stop message


class _Engine(Protocol):
    """What the canary needs from the engine."""

    ledger: Ledger
    client: CapillaryClient
    abort_message: str | None

    async def settle_alone(self, row: WorkRow, confirm: bool = False) -> tuple[RowResult | None, Any]: ...

    async def read_card(self, card: str) -> Outcome: ...

    def abort(self, message: str) -> None: ...


async def run_canary(engine: _Engine, k: int) -> int:
    """Settle up to ``k`` pending rows one at a time, each read back. Returns the rows it settled
    (0: nothing was pending); stops the run through ``engine.abort`` when the contract does not hold."""
    rows = engine.ledger.spread_pending(k)
    if not rows:
        return 0
    log.warning("canary: sending %s spread across the file one at a time, each read back, before "
                "the pool opens (--canary 0 skips this)", plural(len(rows), "row"))
    unsent = {row.id for row in rows}
    try:
        return await _send_one_by_one(engine, rows, unsent)
    finally:
        # A database ledger hands the canary its rows claimed: those it never sent (it stopped early, or
        # was interrupted) go back to pending now, not when their lease runs out.
        if unsent:
            try:
                engine.ledger.release(sorted(unsent))
            except LedgerError:   # the ledger is gone: the error on its way out says so; the lease runs out
                log.debug("could not release the canary's unsent rows", exc_info=True)


async def _send_one_by_one(engine: _Engine, rows: list[WorkRow], unsent: set[int]) -> int:
    proven, no_echo, settled = 0, 0, 0
    failed: Counter[str] = Counter()
    for row in rows:
        unsent.discard(row.id)
        result, ctx = await engine.settle_alone(row, confirm=True)
        if result is None or engine.abort_message:
            return settled or 1   # a fatal answer or Ctrl-C: the engine has already said why
        settled += 1
        put: Outcome | None = ctx.put
        problem = _problem(result, put)
        if problem:
            holds = ctx.read
            if holds is None or not (holds.ok or holds.kind is Kind.REJECTED):
                holds = await engine.read_card(row.card)
            engine.abort(_stop_message(engine, row, ctx.sent_id or row.external_id, problem, put, holds))
            return settled
        if put is None:
            continue          # nothing sent (the card already held its ID, or no ID could be generated)
        if result.state is State.SUCCEEDED:
            proven += 1
            no_echo += put.error_code == NO_ECHO
        elif result.error_code:
            failed[result.error_code] += 1
    outcome = f"{proven} applied as answered" + "".join(f", {n} failed with {c}" for c, n in failed.items())
    if proven:
        log.warning("canary passed: %s (each card read back); opening the pool", outcome)
    else:
        log.warning("canary proved nothing: %s; opening the pool, the tripwire watches the first rows", outcome)
    if no_echo:
        log.warning("canary: the API's answers do not name the cardExternalId they set, so each row costs "
                    "one more request (a read) to confirm it")
    return settled


def _problem(result: RowResult, put: Outcome | None) -> str | None:
    """Why this row's exchange breaks the contract capbatch relies on, or None."""
    if result.error_code == NOT_APPLIED:
        return "the API answered success, but the card read back does not hold the ID sent"
    if put is None:
        return None
    if put.kind is Kind.UNCONFIRMED and put.error_code == CONTRADICTS:
        return f"the answer contradicts the request: {put.error_message}"
    if result.error_code == UNCONFIRMED:
        return "the card could not be read back to check the answer"
    if put.http_status is not None and put.http_status not in DOCUMENTED_STATUS:
        return f"an answer of a kind capbatch does not know (HTTP {put.http_status}, undocumented for this call)"
    if put.kind is Kind.REJECTED and not is_known_code(put.error_code):
        return (f"an answer of a kind capbatch does not know (HTTP {put.http_status}, error code "
                f"{put.error_code}: {put.error_message})")
    return None


def _stop_message(engine: _Engine, row: WorkRow, external_id: str, problem: str, put: Outcome | None,
                  holds: Outcome) -> str:
    client = engine.client
    found = engine.ledger.row(row.id)
    label = row_label(found["sheet"], found["row_number"]) if found else str(row.id)
    sent = client.put_body(row.card, external_id).decode("utf-8", "replace")
    lines = [f"canary stopped the run at input row {label} (card {row.card!r}): {problem}.",
             f"  sent:       PUT {client.base_url}/v2/card?format=json  {sent}"]
    if put is not None:
        lines.append(f"  answered:   {_exchange(put)}")
    lines.append(f"  card holds: GET {client.base_url}/v2/card?number={row.card} -> {_holding(holds)}")
    lines.append("  Take these lines to Capillary support (they show the exact request and answers). The rows "
                 "the canary settled stay settled, the rest stay pending; rerun the same command once the org "
                 "is fixed. If an org needs more fields in the update (statusLabel, seriesId), add them with "
                 "--extra-field NAME=VALUE. --canary 0 skips this check: answers that contradict their request "
                 "are still checked by reading the card, but a success answer is then taken at its word unless "
                 "--read-back reads every card after its PUT.")
    return "\n".join(lines)


def _exchange(outcome: Outcome) -> str:
    if outcome.http_status is None:
        return f"no answer ({outcome.error_code}: {outcome.error_message})"
    body = outcome.raw.decode("utf-8", "replace")
    if len(body) > BODY_SHOWN:
        body = body[:BODY_SHOWN] + f"... ({len(outcome.raw)} bytes)"
    content_type = outcome.content_type.split(";")[0] or "no content type"
    return f"HTTP {outcome.http_status} {content_type}  {body or '(empty body)'}"


def _holding(read: Outcome) -> str:
    if read.ok:
        held = f"cardExternalId {read.external_id!r}" if read.external_id else "no cardExternalId"
        return f"{held}  ({_exchange(read)})"
    return _exchange(read)
