"""Header matching: which columns hold the card number and the external ID, and which later rows
merely repeat the header (two exports joined with ``cat a.csv b.csv``)."""

from __future__ import annotations

import re

from capbatch.errors import InputFileError

from .model import CARD_FIELD, EXTERNAL_ID_FIELD, InputOptions

# Normalised header names (lowercase, alphanumerics only). Canonical names win over aliases.
_CARD_CANONICAL = frozenset({"cardnumber"})
_CARD_ALIASES = frozenset({"cardno", "cardnum", "card"})
_EXT_CANONICAL = frozenset({"cardexternalid"})
_EXT_ALIASES = frozenset({"externalid", "cardextid", "extid", "externalcardid"})

_NOT_ALNUM = re.compile(r"[^0-9a-z]")


def normalize_header(name: str) -> str:
    """Lowercase and drop everything but letters and digits: 'Card Number' -> 'cardnumber'."""
    return _NOT_ALNUM.sub("", name.replace("\ufeff", "").casefold())


def _match_column(
    columns: list[str],
    explicit: str | None,
    canonical: frozenset[str],
    aliases: frozenset[str],
) -> tuple[int | None, list[int]]:
    """Return (index, []) on a unique match, (None, []) when missing, (None, hits) if ambiguous."""
    if explicit is not None:
        exact = [i for i, c in enumerate(columns) if c == explicit]
        if len(exact) == 1:
            return exact[0], []
        if len(exact) > 1:
            return None, exact
        n = normalize_header(explicit)
        hits = [i for i, c in enumerate(columns) if normalize_header(c) == n] if n else []
        if len(hits) == 1:
            return hits[0], []
        return None, hits
    norms = [normalize_header(c) for c in columns]
    for tier in (canonical, aliases):
        hits = [i for i, n in enumerate(norms) if n in tier]
        if len(hits) == 1:
            return hits[0], []
        if len(hits) > 1:
            return None, hits
    return None, []


def resolve_columns(
    columns: list[str], options: InputOptions, where: str
) -> tuple[int, int] | InputFileError:
    """(card index, external-id index) in ``columns``, or the error that explains why not."""
    found = ", ".join(repr(c) for c in columns) if columns else "(none)"
    hint = (
        "name the columns with --card-column NAME and --external-id-column NAME, or set "
        "--header-row N if the headers are not on that row"
    )
    result = []
    for field, explicit, flag, canon, alias in (
        (CARD_FIELD, options.card_column, "--card-column", _CARD_CANONICAL, _CARD_ALIASES),
        (EXTERNAL_ID_FIELD, options.external_id_column, "--external-id-column", _EXT_CANONICAL,
         _EXT_ALIASES),
    ):
        idx, hits = _match_column(columns, explicit, canon, alias)
        if idx is None:
            if hits:
                names = ", ".join(f"{columns[i]!r} (column {i + 1})" for i in hits)
                return InputFileError(
                    f"{where}: the {field} column is ambiguous: {names} all match; "
                    f"columns found: {found}",
                    f"rename one of them, or pick one explicitly with {flag} NAME",
                )
            what = f"column {explicit!r} (given with {flag})" if explicit else f"{field} column"
            return InputFileError(f"{where}: the {what} was not found; columns found: {found}", hint)
        result.append(idx)
    if result[0] == result[1]:
        return InputFileError(
            f"{where}: the same column {columns[result[0]]!r} was matched for both {CARD_FIELD} "
            f"and {EXTERNAL_ID_FIELD}; columns found: {found}",
            hint,
        )
    return result[0], result[1]


def column_note(card_column: str, external_id_column: str) -> str:
    return f"columns: {CARD_FIELD} <- {card_column!r}, {EXTERNAL_ID_FIELD} <- {external_id_column!r}"


class HeaderEcho:
    """Tells a data row that repeats the header row apart from data.

    A row is an echo when its card-number cell and its external-ID cell are both names the header
    matching would accept for those two columns. When the two cells are header names but for the
    *other* column (the second export had another column order), the rows below it would be read
    into the wrong columns: that is ``"swapped"``, and the file is refused.
    """

    def __init__(self, header: list[str], card_idx: int, ext_idx: int, options: InputOptions) -> None:
        card = {normalize_header(header[card_idx])}
        ext = {normalize_header(header[ext_idx])}
        if options.card_column is None:
            card |= _CARD_CANONICAL | _CARD_ALIASES
        if options.external_id_column is None:
            ext |= _EXT_CANONICAL | _EXT_ALIASES
        card.discard("")
        ext.discard("")
        self._card, self._ext = frozenset(card), frozenset(ext)

    def kind(self, card: str, ext: str) -> str | None:
        """None (data), "same" (a repeated header: skip it) or "swapped" (refuse the file)."""
        if not card or card[0].isdigit():
            return None  # the common case: a card number
        c = normalize_header(card)
        if c not in self._card and c not in self._ext:
            return None
        e = normalize_header(ext)
        if c in self._card and e in self._ext:
            return "same"
        if c in self._ext and e in self._card:
            return "swapped"
        return None
