"""The reader's data types: what a caller asks for (InputOptions) and what it gets (SourceRow)."""

from __future__ import annotations

from dataclasses import dataclass

CARD_FIELD = "cardNumber"
EXTERNAL_ID_FIELD = "cardExternalId"

# capbatch's own reports carry this column. Reading such a file back drops the report's own columns
# (every column named capbatch_*) and keeps the user's; text reports also had their cells neutralised
# against formula injection, which the reader undoes.
REPORT_MARKER_COLUMN = "capbatch_row"
REPORT_COLUMN_PREFIX = "capbatch_"

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
