"""The reader's data types: what a caller asks for (InputOptions) and what it gets (SourceRow)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat

CARD_FIELD = "cardNumber"
EXTERNAL_ID_FIELD = "cardExternalId"

# capbatch's own reports carry this column. Reading such a file back drops the report's own columns
# (every column named capbatch_*) and keeps the user's; text reports also had their cells neutralised
# against formula injection, which the reader undoes.
REPORT_MARKER_COLUMN = "capbatch_row"
REPORT_COLUMN_PREFIX = "capbatch_"
# A text report prefixes ' to a cell that starts with one of these after any leading quotes, so a
# spreadsheet shows it as text; the reader strips that one quote again (both through formula_like).
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def formula_like(text: str) -> bool:
    return text.lstrip("'").startswith(FORMULA_TRIGGERS)

SHEET_ALL = "all"  # --sheet all: every visible sheet that carries the required columns


@dataclass(frozen=True)
class InputOptions:
    card_column: str | None = None  # header name given by the user; None = auto-detect
    external_id_column: str | None = None
    delimiter: str | None = None  # None = detect among , ; \t |
    encoding: str | None = None  # None = detect
    # Workbooks: a name, a 0-based index, "all" (every visible sheet with the columns), or None
    # (the one visible sheet with the columns; more than one is refused).
    sheet: str | int | None = None
    header_row: int = 1  # 1-based row holding the headers (rows above are skipped)


@dataclass(frozen=True, slots=True)
class SourceRow:
    sheet: str | None
    row_number: int
    values: tuple[str, ...]
    card: str
    external_id: str
    card_problem: str | None
    external_id_problem: str | None


@dataclass(slots=True)
class RowBatch:
    """Consecutive data rows of one sheet, column by column: what ``rows()`` yields as SourceRows.

    Readers produce batches so that the common case (every row complete, every key cell plain text)
    costs a few C-level passes per batch instead of Python work per row; ``rows()`` is built on them.
    """

    sheet: str | None
    row_numbers: Sequence[int]
    values: list[Sequence[str]]  # each row's cells as text, as many as the header has columns
    cards: list[str]
    external_ids: list[str]
    card_problems: dict[int, str]  # position in the batch -> the reader's problem, where there is one
    external_id_problems: dict[int, str]

    def __len__(self) -> int:
        return len(self.cards)

    def rows(self) -> Iterator[SourceRow]:
        cp, ep = self.card_problems, self.external_id_problems
        return map(SourceRow, repeat(self.sheet), self.row_numbers, map(tuple, self.values), self.cards,
                   self.external_ids, map(cp.get, range(len(self))) if cp else repeat(None),
                   map(ep.get, range(len(self))) if ep else repeat(None))

    def select(self, keep: Sequence[int]) -> RowBatch:
        """The rows at positions ``keep`` (ascending), as a batch of their own."""
        where = {old: new for new, old in enumerate(keep)}
        return RowBatch(self.sheet, [self.row_numbers[i] for i in keep], [self.values[i] for i in keep],
                        [self.cards[i] for i in keep], [self.external_ids[i] for i in keep],
                        {where[i]: p for i, p in self.card_problems.items() if i in where},
                        {where[i]: p for i, p in self.external_id_problems.items() if i in where})


def batches_of(rows: Iterator[SourceRow], size: int = 10_000) -> Iterator[RowBatch]:
    """SourceRows grouped into batches (a batch never spans two sheets)."""
    batch: RowBatch | None = None
    for r in rows:
        if batch is None or r.sheet != batch.sheet or len(batch) >= size:
            if batch is not None:
                yield batch
            batch = RowBatch(r.sheet, [], [], [], [], {}, {})
        if r.card_problem is not None:
            batch.card_problems[len(batch)] = r.card_problem
        if r.external_id_problem is not None:
            batch.external_id_problems[len(batch)] = r.external_id_problem
        batch.row_numbers.append(r.row_number)  # type: ignore[attr-defined]
        batch.values.append(r.values)
        batch.cards.append(r.card)
        batch.external_ids.append(r.external_id)
    if batch is not None:
        yield batch


class CellProblem(str):
    """A user-facing reason (it *is* the message string) that also carries a stable ``code``."""

    code: str

    def __new__(cls, code: str, message: str) -> CellProblem:
        obj = super().__new__(cls, message)
        obj.code = code
        return obj

    def __getnewargs__(self) -> tuple[str, str]:  # type: ignore[override]
        return (self.code, str(self))


def show(value: str, limit: int = 40) -> str:
    """A value as it appears in a message: quoted, cut to ``limit`` characters."""
    v = value if len(value) <= limit else value[: limit - 1] + "\u2026"
    return repr(v)
