"""Per-row validation: decide the exact text to send, or the reason not to send it.

Cross-row rules (duplicates, conflicts) live in the ledger, not here.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from capbatch.errors import UsageError
from capbatch.source import SourceRow

__all__ = ["RuleSettings", "Verdict", "check_row", "compile_settings", "PLACEHOLDERS"]


@dataclass(frozen=True)
class RuleSettings:
    max_external_id_length: int = 50
    max_card_length: int = 50
    external_id_length: int | None = None  # the org's CONF_CARD_NUMBER_LENGTH, when stated
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


# Case-insensitive placeholder texts that mean "no value".
PLACEHOLDERS = frozenset(
    {"na", "n/a", "#n/a", "null", "none", "nil", "-", "--", "?", "nan", "n.a.", "#null!"}
)

# Space-like characters trimmed at both ends (all Unicode Zs: space, NBSP, figure space,
# narrow NBSP, en/em spaces, ideographic space...).
_SPACES = " \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
# Excel/float renderings of numbers: 4.11111E+15, 4,11111E+15, 1E+15, 4.1e15 (a bare 12E45 is
# left alone: it may be a genuine alphanumeric id).
_SCIENTIFIC = re.compile(r"[+-]?\d+(?:[.,]\d+[eE][+-]?\d+|[eE][+-]\d+)")
_FLOAT_RENDERING = re.compile(r"\d+\.0+")

_LABEL = {"card": "card number", "external_id": "external id"}


def _show(value: str, limit: int = 40) -> str:
    v = value if len(value) <= limit else value[: limit - 1] + "\u2026"
    return repr(v)


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
    if settings.external_id_pattern is not None:
        _compiled(settings.external_id_pattern)
    return settings


def _invisible_chars(value: str) -> list[str]:
    if value.isascii():
        return _ASCII_CONTROL.findall(value)
    cat = unicodedata.category
    return [c for c in value if cat(c) in _INVISIBLE_CATEGORIES]


def _problem_code(problem: str) -> str:
    code = getattr(problem, "code", None)
    if code:
        return code
    low = problem.lower()
    for needle, c in (
        ("formula", "formula_no_value"),
        ("excel error", "excel_error"),
        ("date", "excel_date"),
        ("logical value", "excel_bool"),
        ("number", "excel_number"),
        ("cells but the header", "extra_cells"),
    ):
        if needle in low:
            return c
    return "excel_cell"


class _Reject(Exception):
    def __init__(self, code: str, reason: str, column: str | None) -> None:
        self.code, self.reason, self.column = code, reason, column


def _clean(raw: str, column: str, settings: RuleSettings) -> str:
    """Trim, check for invisible characters and number artefacts. Raises _Reject."""
    value = raw.strip(_SPACES)
    if value.isascii() and value.isalnum():
        # fast path (the common case): no control characters, no '.', ',', '+', '-' or '/',
        # so only a word placeholder ('NA', 'null', 'nan'...) can be wrong with it
        if value.casefold() not in PLACEHOLDERS:
            return value
    label = _LABEL[column]
    bad = _invisible_chars(value)
    if bad:
        if settings.strip_invisible:
            value = "".join(c for c in value if c not in set(bad)).strip(_SPACES)
        else:
            names = ", ".join(sorted({f"U+{ord(c):04X}" for c in bad}))
            raise _Reject(
                "invisible_chars",
                f"{label} {_show(value)} contains invisible or control characters ({names}); "
                "delete and retype the value, or run with --strip-invisible to remove them",
                column,
            )
    if not value:
        return value
    if value.casefold() in PLACEHOLDERS:
        raise _Reject(
            "placeholder",
            f"{label} {_show(value)} is a placeholder, not a value; enter the real {label} "
            "or remove the row",
            column,
        )
    if _SCIENTIFIC.fullmatch(value):
        raise _Reject(
            "scientific_notation",
            f"{label} {_show(value)} is in scientific notation: the digits were lost by Excel; "
            "format the column as Text and re-enter the numbers (or take them from the source "
            "system)",
            column,
        )
    if _FLOAT_RENDERING.fullmatch(value):
        raise _Reject(
            "float_rendering",
            f"{label} {_show(value)} looks like a number converted to a decimal (a trailing "
            "'.0' was added by a program that read the column as numbers); export the column "
            "as Text so the value is exactly what was typed",
            column,
        )
    return value


def check_row(row: SourceRow, settings: RuleSettings = RuleSettings()) -> Verdict:
    """The verdict for one row: cleaned values, or the first reason (card first) to reject."""
    card = row.card
    ext = row.external_id
    try:
        if row.card_problem:
            code = _problem_code(row.card_problem)
            raise _Reject(code, row.card_problem, None if code == "extra_cells" else "card")
        card = _clean(row.card, "card", settings)
        if not card:
            raise _Reject(
                "missing_card",
                "the card number is empty; fill it in or remove the row",
                "card",
            )
        if len(card) > settings.max_card_length:
            raise _Reject(
                "too_long",
                f"card number {_show(card)} is {len(card)} characters long, more than the "
                f"maximum of {settings.max_card_length}; check that the right column is mapped "
                "as the card number",
                "card",
            )
        if row.external_id_problem:
            raise _Reject(
                _problem_code(row.external_id_problem), row.external_id_problem, "external_id"
            )
        ext = _clean(row.external_id, "external_id", settings)
        if not ext:
            if settings.allow_missing_external_id:
                return Verdict(card, "", None, None, None)
            raise _Reject(
                "missing_external_id",
                f"the external id for card {_show(card)} is empty; fill it in, remove the row, "
                "or use the generate-missing mode",
                "external_id",
            )
        if len(ext) > settings.max_external_id_length:
            raise _Reject(
                "too_long",
                f"external id {_show(ext)} is {len(ext)} characters long, more than the maximum "
                f"of {settings.max_external_id_length}; shorten it or check the column mapping",
                "external_id",
            )
        if settings.external_id_length is not None and len(ext) != settings.external_id_length:
            raise _Reject(
                "wrong_length",
                f"external id {_show(ext)} is {len(ext)} characters long but this org requires "
                f"exactly {settings.external_id_length}; correct the value (leading zeros "
                "lost by Excel are a common cause: format the column as Text)",
                "external_id",
            )
        if settings.external_id_pattern is not None and not _compiled(
            settings.external_id_pattern
        ).fullmatch(ext):
            raise _Reject(
                "pattern",
                f"external id {_show(ext)} does not match the required pattern "
                f"{settings.external_id_pattern!r}; correct the value or the pattern",
                "external_id",
            )
    except _Reject as r:
        return Verdict(card.strip(_SPACES), ext.strip(_SPACES), r.code, r.reason, r.column)
    return Verdict(card, ext, None, None, None)
