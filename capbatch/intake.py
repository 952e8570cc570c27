"""Stages 2-3 in bulk: an input's rows, checked, into a ledger, a batch at a time.

The rows come as :class:`~capbatch.source.RowBatch` es; each is checked with
:func:`capbatch.rules.check_batch`, its original cells are encoded as the JSON array the ledger keeps
(``original``), and the ledger rows are built column by column. On the way, every row's card number
and external ID are hashed (:class:`KeyHashes`): after the import, only the rows whose card or external
ID hash is shared with another row can be a duplicate or a conflict, so the cross-row rules look at
those rows only (none, in a clean file).
"""

from __future__ import annotations

import contextlib
import gc
import json
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, repeat
from typing import Any, Protocol

from .ledger import Ledger
from .rules import CheckedBatch, RuleSettings, check_batch
from .source import RowBatch

PENDING, REJECTED = "pending", "rejected"

_encode = json.JSONEncoder(ensure_ascii=False).encode
# A row whose cells hold nothing json.dumps(..., ensure_ascii=False) escapes is encoded by joining its
# cells: the same text, without the encoder's cost per call.
_JSON_SEPARATOR = '", "'.join


class Rows(Protocol):
    """What is read: an InputTable or a MemoryTable."""

    def batches(self) -> Iterator[RowBatch]: ...


def original_json(values: Sequence[Sequence[str]]) -> list[str]:
    """Each row's cells as the JSON array text json.dumps(list, ensure_ascii=False) gives."""
    if _escape_free("".join(chain.from_iterable(values))):
        return ['["' + _JSON_SEPARATOR(v) + '"]' for v in values]
    return ['["' + _JSON_SEPARATOR(v) + '"]' if _escape_free("".join(v)) else _encode(list(v)) for v in values]


def _escape_free(text: str) -> bool:
    """No character json.dumps(..., ensure_ascii=False) escapes: a quote, a backslash, a control
    character (isprintable() is False for every one of those, and for some others: never wrong)."""
    return text.isprintable() and '"' not in text and "\\" not in text


class KeyHashes:
    """The hash of every imported row's card number and external ID, in ledger order (id 1, 2, ...).

    Two rows can only be duplicates or conflict when they share a card number or an external ID, so
    they share its hash: :meth:`suspects` lists the ids of every row whose card or external ID hash
    occurs more than once (a superset of the rows the cross-row rules can touch; hash collisions only
    add rows). Eight bytes per row and column: flat enough for millions of rows.
    """

    def __init__(self) -> None:
        self.cards = array("q")
        self.external_ids = array("q")

    def __len__(self) -> int:
        return len(self.cards)

    def add(self, cards: Iterable[str], external_ids: Iterable[str]) -> None:
        # array.extend(list) copies in one call; from an iterator it appends item by item
        self.cards.extend(array("q", list(map(hash, cards))))
        self.external_ids.extend(array("q", list(map(hash, external_ids))))

    def suspects(self) -> list[int]:
        """Ledger ids (1-based) of the rows sharing a card or an external ID hash with another row."""
        at = sorted(set(_repeated(self.cards)) | set(_repeated(self.external_ids)))
        return [i + 1 for i in at]


_NUMPY_FROM = 200_000  # below this many rows a set is quicker than importing numpy


def _repeated(hashes: array) -> list[int]:
    """Positions of the values that occur more than once."""
    if len(hashes) < _NUMPY_FROM:
        if len(set(hashes)) == len(hashes):
            return []
        first: dict[int, int] = {}
        out: set[int] = set()
        for i, h in enumerate(hashes):
            j = first.setdefault(h, i)
            if j != i:
                out.update((i, j))
        return sorted(out)
    import numpy as np

    values = np.frombuffer(hashes, dtype=np.int64)
    ordered = np.sort(values)
    if not (ordered[1:] == ordered[:-1]).any():  # the common case: every value once
        return []
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    same = ordered[1:] == ordered[:-1]
    shared = np.zeros(len(values), dtype=bool)
    shared[1:] |= same
    shared[:-1] |= same
    return sorted(order[shared].tolist())


def ledger_rows(table: Rows, rules: RuleSettings, keys: KeyHashes | None = None) -> Iterator[tuple[Any, ...]]:
    """Every input row with its verdict, as :meth:`Ledger.import_rows` takes it (in input order);
    ``keys`` is fed each row's card number and external ID on the way."""
    return chain.from_iterable(_ledger_tuples(batch, *_check(batch, rules, keys)) for batch in table.batches())


def _check(batch: RowBatch, rules: RuleSettings, keys: KeyHashes | None) -> tuple[CheckedBatch, list[str]]:
    checked = check_batch(batch, rules)
    if keys is not None:
        keys.add(checked.cards, checked.external_ids)
    return checked, original_json(batch.values)


def _ledger_tuples(batch: RowBatch, checked: CheckedBatch, originals: list[str]) -> Iterator[tuple[Any, ...]]:
    if not checked.rejected:
        return zip(repeat(batch.sheet), batch.row_numbers, originals, checked.cards, checked.external_ids,
                   repeat(PENDING), repeat(None), repeat(None), repeat(None))
    n = len(batch)
    states = [PENDING] * n
    codes: list[str | None] = [None] * n
    reasons: list[str | None] = [None] * n
    columns: list[str | None] = [None] * n
    for i, v in checked.rejected.items():
        states[i], codes[i], reasons[i], columns[i] = REJECTED, v.reason_code, v.reason, v.column
    return zip(repeat(batch.sheet), batch.row_numbers, originals, checked.cards, checked.external_ids,
               states, codes, reasons, columns)


@contextlib.contextmanager
def bulk() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of rows pass through: they make no reference
    cycles (reference counting frees each batch), but their allocations would set off collections
    that walk every live object -- a third of the time of reading a large file."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_rows(ledger: Ledger, table: Rows, rules: RuleSettings) -> int:
    """Import every row of ``table`` with its verdict, then apply the cross-row rules to the rows that
    can be involved. Returns the number of rows imported."""
    keys = KeyHashes()
    count = ledger.import_rows(ledger_rows(table, rules, keys))
    ledger.apply_cross_row_rules(allow_empty_external_id=rules.allow_missing_external_id, only=keys.suspects())
    return count


def load_for_validation(ledger: Ledger, table: Rows, rules: RuleSettings) -> int:
    """validate's import: the ledger gets, under their input ids, only the rows a validation reports or
    plans with -- the rejected ones, the ones without an external ID, and every row that may be a
    duplicate or a conflict -- and the cross-row rules run on those. The other rows are valid and
    unique: they are only counted. Returns how many valid rows the ledger does not hold.

    Importing a million plain rows into SQLite costs more than reading and checking them: a file without
    problems imports nothing here. Which rows may be duplicates is known only at the end, so when a card
    number or an external ID repeats, the rows are read a second time to pick those rows up.
    """
    keys = KeyHashes()

    def special_rows() -> Iterator[tuple[Any, ...]]:
        for first_id, batch, checked in _numbered(table, rules, keys):
            at = _always_kept(checked)
            if at:
                yield from _numbered_rows(first_id, batch.select(at), _selected(checked, at), at)

    def suspect_rows(wanted: set[int]) -> Iterator[tuple[Any, ...]]:
        for first_id, batch, checked in _numbered(table, rules, None):
            kept = set(_always_kept(checked))
            at = [i for i in range(len(batch)) if first_id + i in wanted and i not in kept]
            if at:
                yield from _numbered_rows(first_id, batch.select(at), _selected(checked, at), at)

    stored = ledger.import_rows(special_rows(), numbered=True)
    suspects = keys.suspects()
    if suspects:
        stored += ledger.import_rows(suspect_rows(set(suspects)), numbered=True)
    ledger.apply_cross_row_rules(allow_empty_external_id=rules.allow_missing_external_id, only=suspects)
    return len(keys) - stored


def _numbered(table: Rows, rules: RuleSettings, keys: KeyHashes | None) -> Iterator[tuple[int, RowBatch, CheckedBatch]]:
    """(id of the batch's first row, batch, its verdicts) for every batch."""
    first_id = 1
    for batch in table.batches():
        checked = check_batch(batch, rules)
        if keys is not None:
            keys.add(checked.cards, checked.external_ids)
        yield first_id, batch, checked
        first_id += len(batch)


def _always_kept(checked: CheckedBatch) -> list[int]:
    """Positions of the rows validate's ledger always holds: rejected, or without an external ID."""
    at = set(checked.rejected)
    if "" in checked.external_ids:
        at.update(i for i, e in enumerate(checked.external_ids) if not e)
    return sorted(at)


def _selected(checked: CheckedBatch, at: list[int]) -> CheckedBatch:
    where = {old: new for new, old in enumerate(at)}
    return CheckedBatch([checked.cards[i] for i in at], [checked.external_ids[i] for i in at],
                        {where[i]: v for i, v in checked.rejected.items() if i in where})


def _numbered_rows(first_id: int, batch: RowBatch, checked: CheckedBatch, at: list[int]) -> Iterator[tuple[Any, ...]]:
    rows = _ledger_tuples(batch, checked, original_json(batch.values))
    return ((first_id + i, *row) for i, row in zip(at, rows))
