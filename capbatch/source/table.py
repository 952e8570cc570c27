"""The entry point: ``open_input`` opens and checks a file of any format; ``InputTable.rows()``
streams its data rows. What every format shares happens here: repeated header rows are skipped,
an input without data rows is refused, and a capbatch report read back loses its own columns."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capbatch.errors import InputFileError, UsageError

from .census import Census
from .delimited import DelimitedReader, open_delimited
from .headers import column_note
from .model import REPORT_COLUMN_PREFIX, REPORT_MARKER_COLUMN, InputOptions, RowBatch, SourceRow, formula_like
from .sniff import decide_format
from .workbook import open_workbook

def _restore(value: str) -> str:
    return value[1:] if value[:1] == "'" and formula_like(value[1:]) else value


class InputTable:
    """An opened, validated input. ``rows()`` streams SourceRow objects; each call restarts."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.format = fmt
        self.encoding: str | None = None
        self.delimiter: str | None = None
        self.sheet: str | None = None  # the sheet read (the first one with --sheet all)
        self.sheets: tuple[str, ...] = ()  # every sheet read, in order
        self.sheet_rows: dict[str, int] = {}  # data rows per sheet read
        self.columns: list[str] = []  # the user's columns (a report's own columns dropped)
        self.card_column = ""
        self.external_id_column = ""
        self.notes: list[str] = []
        self.row_count: int | None = None  # data rows rows() yields
        self._reader: Any = None
        self._skip: set[tuple[str | None, int]] = set()
        self._keep: list[int] | None = None  # column indexes kept (a capbatch report)
        self._restore = False  # undo the formula-injection neutralising of a text report
        self._unsurveyed: Census | None = None  # open_input(survey=False): the pass rows() makes first
        self._notes_at = 0  # where the structural pass's notes go

    def __repr__(self) -> str:
        return (
            f"InputTable(path={str(self.path)!r}, format={self.format!r}, sheets={self.sheets!r}, "
            f"encoding={self.encoding!r}, delimiter={self.delimiter!r}, columns={self.columns!r})"
        )

    @property
    def sheet_choice(self) -> str | list[str] | None:
        """What decides which rows are read: the sheet, or the list of sheets (--sheet all)."""
        return list(self.sheets) if len(self.sheets) > 1 else self.sheet

    def rows(self) -> Iterator[SourceRow]:
        for batch in self.batches():
            yield from batch.rows()

    def batches(self) -> Iterator[RowBatch]:
        """The data rows, a batch at a time (see :class:`RowBatch`); each call restarts."""
        if self._unsurveyed is None:
            yield from self._filtered(self._reader.batches(), None)
            return
        # open_input(survey=False): this pass is also the structural one (see open_input)
        census = self._unsurveyed.fresh()
        yield from self._filtered(self._reader.batches(structure=True), census)
        self._unsurveyed = None
        self.notes[self._notes_at:self._notes_at] = self._reader.structure_notes()
        _counted(self, [census])

    def _filtered(self, batches: Iterator[RowBatch], census: Census | None) -> Iterator[RowBatch]:
        skip, keep, restore = self._skip, self._keep, self._restore
        for batch in batches:
            if census is not None:
                census.see_batch(batch.sheet, batch.row_numbers, batch.cards, batch.external_ids)
                skip = census.skip
            if skip:
                sheet = batch.sheet
                kept = [i for i, n in enumerate(batch.row_numbers) if (sheet, n) not in skip]
                if len(kept) < len(batch):
                    batch = batch.select(kept)
            if keep is not None:
                batch = _report_batch(batch, keep, restore)
            if len(batch):
                yield batch


def _report_batch(batch: RowBatch, keep: list[int], restore: bool) -> RowBatch:
    """A capbatch report read back: the user's columns only, neutralised text cells restored."""
    values = [tuple(v[i] for i in keep) for v in batch.values]
    cards, exts = batch.cards, batch.external_ids
    if restore:
        values = [tuple(map(_restore, v)) for v in values]
        cards, exts = list(map(_restore, cards)), list(map(_restore, exts))
    return RowBatch(batch.sheet, batch.row_numbers, values, cards, exts, batch.card_problems,
                    batch.external_id_problems)


def _finish(table: InputTable, header: list[str], ci: int, ei: int, censuses: list[Census] | None) -> None:
    """What the header decides; then what the structural pass found (``censuses``), unless that pass
    is still to come (open_input(survey=False))."""
    table.card_column, table.external_id_column = header[ci], header[ei]
    table.notes.insert(0, column_note(table.card_column, table.external_id_column))
    table._notes_at = len(table.notes)
    if REPORT_MARKER_COLUMN in header:
        table._keep = [i for i, c in enumerate(header) if not c.startswith(REPORT_COLUMN_PREFIX)]
        table._restore = table.format == "csv"
        table.columns = [header[i] for i in table._keep]
        dropped = len(header) - len(table.columns)
        table.notes.append(
            f"this is a capbatch report: its own {dropped} capbatch_* columns are dropped and the "
            "user's columns kept"
            + ("; cells neutralised against formula injection are restored to their original values"
               if table._restore else ""))
    else:
        table.columns = list(header)
    if censuses is not None:
        _counted(table, censuses)


def _counted(table: InputTable, censuses: list[Census]) -> None:
    """The structural pass is done: repeated headers to skip, its notes, the row count."""
    for census in censuses:
        table._skip |= census.skip
        notes = census.notes()
        table.notes[table._notes_at:table._notes_at] = notes
        table._notes_at += len(notes)
    table.row_count = sum(c.count for c in censuses)
    if table.row_count == 0:
        where = f"sheet {table.sheet!r} of {table.path.name}" if table.sheet else table.path.name
        raise InputFileError(
            f"{where}: the header row is there but 0 data rows follow it",
            "the export that produced this file is probably broken or was cut short; check it "
            "upstream (an empty file is refused so that a scheduled run does not pass as clean)",
        )


def open_input(path: str | Path, options: InputOptions = InputOptions(), survey: bool = True) -> InputTable:
    """Open and validate an input file. Raises InputFileError for file-level problems.

    ``survey=False``, for a caller that reads every row before it acts on any (into a ledger it can
    throw away): a delimited file's structural pass (quoting, repeated headers, the row count) is made
    by the first complete iteration of rows()/batches() instead of here, so the file is parsed once.
    The errors that pass finds are raised from that iteration; ``row_count`` and ``notes`` are
    complete after it. Workbooks are surveyed here either way."""
    p = Path(path)
    if not isinstance(options.header_row, int) or options.header_row < 1:
        raise UsageError(
            f"invalid header row {options.header_row!r}",
            "--header-row is the 1-based row number holding the column names (1 or more)",
        )
    if not p.exists():
        raise InputFileError(f"{p}: file not found", "check the path and try again")
    if p.is_dir():
        raise InputFileError(f"{p}: is a directory, not a file", "pass the spreadsheet file itself")
    try:
        fmt, notes = decide_format(p, options)
        table = InputTable(p, fmt)
        table.notes.extend(notes)
        if fmt == "csv":
            layout, census = open_delimited(p, options, table.notes, survey)
            table.encoding, table.delimiter = layout.encoding, layout.delimiter
            table._reader = DelimitedReader(p, layout)
            if not survey:
                table._unsurveyed = census
            _finish(table, layout.header, layout.card_idx, layout.ext_idx, [census] if survey else None)
        else:
            reader, plans = open_workbook(p, fmt, options, table.notes)
            table._reader = reader
            table.sheets = tuple(plan.name for plan in plans)
            table.sheet = plans[0].name
            table.sheet_rows = {plan.name: plan.rows for plan in plans}
            first = plans[0]
            _finish(table, first.header, first.card_idx, first.ext_idx, [plan.census for plan in plans])
    except PermissionError as e:
        raise InputFileError(f"{p}: permission denied", "check the file permissions") from e
    return table
