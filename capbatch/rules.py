"""Per-row validation: decide the exact text to send, or the reason not to send it.

Whether one cell's text may be sent at all (trimming, placeholders, spreadsheet errors, scientific
notation...) is decided by the cell rules every format shares (``capbatch.source.cells``); this
module adds the row's rules: both values present, lengths, the org's pattern. Cross-row rules
(duplicates, conflicts) live in the ledger, not here.
"""

from __future__ import annotations

import bisect
import functools
import operator
import re
from dataclasses import dataclass

from capbatch.errors import UsageError
from capbatch.source import SourceRow
from capbatch.source.cells import PLACEHOLDERS, TRIMMED, CellRejected, clean_text, plain_texts, problem_code
from capbatch.source.model import RowBatch
from capbatch.source.model import show

__all__ = ["CARD_LENGTH", "PLACEHOLDERS", "CheckedBatch", "RuleSettings", "Verdict", "check_batch", "check_row",
           "compile_settings"]


@dataclass(frozen=True)
class RuleSettings:
    max_external_id_length: int = 50
    max_card_length: int = 150  # error 3024: "total card length should be <= 150"
    external_id_length: int | None = None  # the org's CONF_CARD_NUMBER_LENGTH, when stated
    # error 3050: the external ID must be at least this long; CARD_LENGTH = the row's card length
    external_id_min_length: int | str | None = None
    external_id_pattern: str | None = None  # regex the whole external id must match
    strip_invisible: bool = False  # strip zero-width/control characters instead of rejecting
    allow_missing_external_id: bool = False  # generate-missing mode


@dataclass(frozen=True, slots=True)
class Verdict:
    card: str
    external_id: str
    reason_code: str | None
    reason: str | None
    column: str | None


CARD_LENGTH = "card"  # external_id_min_length: at least as long as the row's card number


@functools.lru_cache(maxsize=32)
def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(
            f"invalid external id pattern {pattern!r}: {e}",
            "pass a Python regular expression that the whole external id must match, "
            "e.g. --external-id-pattern '[A-Z]{3}[0-9]{8}'",
        ) from None


def compile_settings(settings: RuleSettings | None = None, **kwargs: object) -> RuleSettings:
    """Validate settings once (regex, lengths). Returns the settings; raises UsageError."""
    if settings is None:
        settings = RuleSettings(**kwargs)  # type: ignore[arg-type]
    for name in ("max_external_id_length", "max_card_length"):
        v = getattr(settings, name)
        if not isinstance(v, int) or v < 1:
            raise UsageError(f"invalid {name} {v!r}", "use a whole number of 1 or more")
    if settings.external_id_length is not None and (
        not isinstance(settings.external_id_length, int) or settings.external_id_length < 1
    ):
        raise UsageError(
            f"invalid external id length {settings.external_id_length!r}",
            "use a whole number of 1 or more (the org's card number length)",
        )
    minimum = settings.external_id_min_length
    if minimum is not None and minimum != CARD_LENGTH and (
        not isinstance(minimum, int) or not 1 <= minimum <= settings.max_external_id_length
    ):
        raise UsageError(
            f"invalid external id minimum length {minimum!r}",
            f"use a whole number from 1 to {settings.max_external_id_length}, or '{CARD_LENGTH}' "
            "(at least as long as each row's card number)",
        )
    exact = settings.external_id_length
    if exact is not None and isinstance(minimum, int) and exact < minimum:
        raise UsageError(
            f"the external id length {exact} is below the minimum length {minimum}",
            "give one of --external-id-length and --external-id-min-length, or make them agree",
        )
    if settings.external_id_pattern is not None:
        _compiled(settings.external_id_pattern)
    return settings


class _Reject(Exception):
    def __init__(self, code: str, reason: str, column: str | None) -> None:
        self.code, self.reason, self.column = code, reason, column


def check_row(row: SourceRow, settings: RuleSettings = RuleSettings()) -> Verdict:
    """The verdict for one row: cleaned values, or the first reason (card first) to reject."""
    return _verdict(row.card, row.external_id, row.card_problem, row.external_id_problem, settings)


BLOCK_ROWS = 256  # a batch that is not clean as a whole is looked at in blocks of this many rows


@dataclass(slots=True)
class CheckedBatch:
    """The verdicts of a batch, column by column: the texts to send, and the rejected rows."""

    cards: list[str]
    external_ids: list[str]
    rejected: dict[int, Verdict]  # position in the batch -> its verdict (reason_code set)


def check_batch(batch: RowBatch, settings: RuleSettings = RuleSettings()) -> CheckedBatch:
    """check_row for every row of ``batch``. A block of rows that :func:`_clean_block` proves clean
    is kept as it is; the other blocks go through check_row's rules row by row."""
    cards, exts = batch.cards, batch.external_ids
    n = len(cards)
    problems = sorted({*batch.card_problems, *batch.external_id_problems})
    if not problems and _clean_block(cards, exts, settings):
        return CheckedBatch(cards, exts, {})
    out_cards, out_exts = list(cards), list(exts)
    rejected: dict[int, Verdict] = {}
    cp, ep = batch.card_problems, batch.external_id_problems
    for start in range(0, n, BLOCK_ROWS):
        end = min(n, start + BLOCK_ROWS)
        at = bisect.bisect_left(problems, start)
        if (at == len(problems) or problems[at] >= end) and _clean_block(cards[start:end], exts[start:end],
                                                                           settings):
            continue
        for i in range(start, end):
            v = _verdict(cards[i], exts[i], cp.get(i), ep.get(i), settings)
            out_cards[i], out_exts[i] = v.card, v.external_id
            if v.reason_code is not None:
                rejected[i] = v
    return CheckedBatch(out_cards, out_exts, rejected)


def _clean_block(cards: list[str], exts: list[str], settings: RuleSettings) -> bool:
    """True only when check_row would accept every one of these rows with its texts unchanged: the
    cell rules cannot apply (:func:`plain_texts`) and the row rules below hold for all of them. It
    may say False for clean rows (they are then checked one by one), never True for another verdict."""
    card_lengths = list(map(len, cards))
    ext_lengths = list(map(len, exts))
    longest_ext, shortest_ext = max(ext_lengths), min(ext_lengths)
    if not (plain_texts(cards, min(card_lengths)) and plain_texts(exts, shortest_ext)):
        return False
    if max(card_lengths) > settings.max_card_length or longest_ext > settings.max_external_id_length:
        return False
    exact = settings.external_id_length
    if exact is not None and not shortest_ext == longest_ext == exact:
        return False
    minimum = settings.external_id_min_length
    if minimum == CARD_LENGTH:
        if not all(map(operator.le, card_lengths, ext_lengths)):
            return False
    elif minimum is not None and shortest_ext < minimum:  # type: ignore[operator]
        return False
    pattern = settings.external_id_pattern
    return pattern is None or all(map(_compiled(pattern).fullmatch, exts))


def _verdict(card: str, ext: str, card_problem: str | None, ext_problem: str | None,
             settings: RuleSettings) -> Verdict:
    at = "card"  # the column a CellRejected is about
    try:
        if card_problem:
            code = problem_code(card_problem)
            raise _Reject(code, card_problem, None if code == "extra_cells" else "card")
        card = clean_text(card, "card number", settings.strip_invisible)
        if not card:
            raise _Reject(
                "missing_card",
                "the card number is empty; fill it in or remove the row",
                "card",
            )
        if len(card) > settings.max_card_length:
            raise _Reject(
                "too_long",
                f"card number {show(card)} is {len(card)} characters long, more than the "
                f"maximum of {settings.max_card_length}; check that the right column is mapped "
                "as the card number",
                "card",
            )
        if ext_problem:
            raise _Reject(problem_code(ext_problem), ext_problem, "external_id")
        at = "external_id"
        ext = clean_text(ext, "external id", settings.strip_invisible)
        if not ext:
            if settings.allow_missing_external_id:
                return Verdict(card, "", None, None, None)
            raise _Reject(
                "missing_external_id",
                f"the external id for card {show(card)} is empty; fill it in, remove the row, "
                "or use the generate-missing mode",
                "external_id",
            )
        if len(ext) > settings.max_external_id_length:
            raise _Reject(
                "too_long",
                f"external id {show(ext)} is {len(ext)} characters long, more than the maximum "
                f"of {settings.max_external_id_length}; shorten it or check the column mapping",
                "external_id",
            )
        if settings.external_id_length is not None and len(ext) != settings.external_id_length:
            raise _Reject(
                "wrong_length",
                f"external id {show(ext)} is {len(ext)} characters long but this org requires "
                f"exactly {settings.external_id_length}; correct the value (leading zeros "
                "lost by Excel are a common cause: format the column as Text)",
                "external_id",
            )
        minimum = settings.external_id_min_length
        if minimum is not None:
            by_card = minimum == CARD_LENGTH
            minimum = len(card) if by_card else minimum
            if len(ext) < minimum:  # type: ignore[operator]
                raise _Reject(
                    "too_short",
                    f"external id {show(ext)} is {len(ext)} characters long but this org requires "
                    f"at least {minimum}"
                    + (f" (the length of card number {show(card)})" if by_card else "")
                    + "; correct the value (leading zeros lost by Excel are a common cause: format "
                    "the column as Text)",
                    "external_id",
                )
        if settings.external_id_pattern is not None and not _compiled(
            settings.external_id_pattern
        ).fullmatch(ext):
            raise _Reject(
                "pattern",
                f"external id {show(ext)} does not match the required pattern "
                f"{settings.external_id_pattern!r}; correct the value or the pattern",
                "external_id",
            )
    except _Reject as r:
        return Verdict(card.strip(TRIMMED), ext.strip(TRIMMED), r.code, r.reason, r.column)
    except CellRejected as r:
        return Verdict(card.strip(TRIMMED), ext.strip(TRIMMED), r.code, r.reason, at)
    return Verdict(card, ext, None, None, None)
