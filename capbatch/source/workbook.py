"""Workbooks (.xlsx, .xls, .ods), read with python-calamine: which sheets, their header, their rows.

The sheet rule: the sheets that carry the required columns on the header row are found first.
Exactly one visible such sheet is read; more than one is refused (naming each with its row count)
unless ``--sheet NAME|INDEX`` picks one or ``--sheet all`` reads every visible one in workbook
order. Hidden and very hidden sheets are read only when named with ``--sheet``.

Values come from calamine; what it does not expose (number formats, error cells, formulas without
a value) comes from one engine module per format (``_xlsx``, ``_xls``, ``_ods``), asked lazily and
only for the two key columns. Each key cell then goes through :mod:`.cells`. Sheets are loaded one
at a time and released before the next, so ``--sheet all`` never holds two sheets in memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any

from capbatch.errors import InputFileError

from ._ods import OdsEngine
from ._xls import XlsEngine
from ._xlsx import XlsxEngine
from .cells import (GENERAL, UNREADABLE_FORMAT, display_text, display_texts, render_whole_numbers,
                    workbook_key)
from .census import Census
from .headers import HeaderEcho, normalize_header, resolve_columns
from .model import CARD_FIELD, EXTERNAL_ID_FIELD, SHEET_ALL, InputOptions, RowBatch, SourceRow, batches_of
from .sniff import ODS_EXTS, XLS_EXTS, XLSX_EXTS, encrypted_error

BATCH_ROWS = 10_000  # rows taken from calamine at a time

_ENGINES = {"xlsx": XlsxEngine, "xls": XlsEngine, "ods": OdsEngine}
_NATIVE_EXTS = {"xlsx": XLSX_EXTS, "xls": XLS_EXTS, "ods": ODS_EXTS}


@dataclass
class SheetPlan:
    """A sheet that carries the required columns."""

    index: int  # 0-based, in workbook order (what --sheet INDEX means)
    name: str
    hidden: bool
    header: list[str]
    card_idx: int
    ext_idx: int
    col0: int  # the sheet's first used column (calamine rows start there)
    census: Census

    @property
    def rows(self) -> int:
        return self.census.count

    def described(self) -> str:
        return f"{self.index}: {self.name!r} ({_n_rows(self.rows)})"


def _n_rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _calamine_error(path: Path, e: Exception) -> InputFileError:
    import python_calamine as pc

    if isinstance(e, pc.PasswordError) or "password" in str(e).lower() or "encrypt" in str(e).lower():
        return encrypted_error(path)
    return InputFileError(
        f"{path.name}: the workbook is damaged or not a valid spreadsheet ({type(e).__name__}: {e})",
        "open it in its spreadsheet program and save it again (or export the sheet as CSV UTF-8), "
        "then run again",
    )


class Workbook:
    """A calamine workbook plus the format's engine for what calamine does not say."""

    def __init__(self, path: Path, fmt: str) -> None:
        import python_calamine as pc

        self.path = path
        self.fmt = fmt
        try:
            if path.suffix.lower() in _NATIVE_EXTS[fmt]:
                self._book = pc.CalamineWorkbook.from_path(str(path))
            else:  # by content: the extension does not say what the file is
                with open(path, "rb") as fh:
                    self._book = pc.CalamineWorkbook.from_filelike(fh)
            self.metas = list(self._book.sheets_metadata)
        except Exception as e:
            raise _calamine_error(path, e) from e
        self.names = [m.name for m in self.metas]
        self.engine = _ENGINES[fmt](path)
        self._kept: tuple[str, Any] | None = None

    def load(self, name: str, keep: bool = False) -> Any:
        """The sheet, loaded whole by calamine. ``keep``: hold on to it for the next load of the same
        sheet (planning keeps the sheet read first: a sheet costs seconds to load). At most one sheet is
        kept, and it is let go before another is loaded."""
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == name:
            return kept[1]
        del kept
        try:
            sheet = self._book.get_sheet_by_name(name)
        except Exception as e:
            raise _calamine_error(self.path, e) from e
        if keep:
            self._kept = (name, sheet)
        return sheet

    def is_worksheet(self, i: int) -> bool:
        return "WorkSheet" in str(self.metas[i].typ)

    def is_hidden(self, i: int) -> bool:
        return "Hidden" in str(self.metas[i].visible)  # Hidden or VeryHidden


def _header_of(sheet: Any, header_row: int) -> list[str] | None:
    for i, raw in enumerate(sheet.iter_rows()):
        if i == header_row - 1:
            cells = [display_text(v) for v in raw]
            while cells and cells[-1] == "":
                cells.pop()
            if cells:
                cells[0] = cells[0].lstrip("\ufeff")
            return cells
    return None


def _survey(sheet: Any, plan: SheetPlan, header_row: int) -> None:
    """Count the sheet's data rows through the census (repeated headers, notes), a batch at a time."""
    width = len(plan.header)
    ci, ei = plan.card_idx, plan.ext_idx
    census = plan.census
    rows = sheet.iter_rows()
    deque(islice(rows, header_row), maxlen=0)
    i = header_row  # 0-based index of the chunk's first row
    while chunk := list(islice(rows, BATCH_ROWS)):
        first, i = i, i + len(chunk)
        cards = list(map(itemgetter(ci), chunk)) if min(map(len, chunk)) >= width else None
        if cards is not None and "" not in cards:  # the common case: no blank row
            exts = list(map(itemgetter(ei), chunk))
            census.see_batch(plan.name, range(first + 1, i + 1), _texts_only(cards), _texts_only(exts))
            continue
        for n, raw in enumerate(chunk, first + 1):
            cells = raw[:width]
            if any(v != "" for v in cells):
                k = len(cells)
                card = cells[ci] if ci < k else ""
                ext = cells[ei] if ei < k else ""
                census.see(plan.name, n, card if type(card) is str else "", ext if type(ext) is str else "")


def _texts_only(values: list[Any]) -> list[str]:
    """Each value that is text; '' for a typed cell (what the census is fed)."""
    if set(map(type, values)) <= {str}:
        return values
    return [v if type(v) is str else "" for v in values]


def _plan(book: Workbook, i: int, options: InputOptions, survey: bool = True) -> SheetPlan | InputFileError:
    """The sheet's plan when its header row carries the required columns, else why not."""
    name = book.names[i]
    hr = options.header_row
    sheet = book.load(name, keep=True)
    header = _header_of(sheet, hr)
    if header is None:
        return InputFileError(
            f"{book.path.name}: sheet {name!r} has fewer than {hr} rows, so there is no header on "
            f"row {hr}",
            "check --sheet and --header-row",
        )
    res = resolve_columns(header, options, f"{book.path.name}, sheet {name!r}, row {hr}")
    if isinstance(res, InputFileError):
        res.header = header  # type: ignore[attr-defined]
        return res
    census = Census(HeaderEcho(header, res[0], res[1], options), book.path.name)
    start = sheet.start
    plan = SheetPlan(i, name, book.is_hidden(i), header, res[0], res[1],
                     start[1] if start is not None else 0, census)
    if survey:
        _survey(sheet, plan, hr)
    return plan


def _find_sheet(book: Workbook, wanted: str | int) -> int:
    names = book.names
    if isinstance(wanted, int):
        if 0 <= wanted < len(names):
            return wanted
    elif wanted in names:
        return names.index(wanted)
    else:
        folded = [i for i, n in enumerate(names) if n.casefold() == wanted.strip().casefold()]
        if len(folded) == 1:
            return folded[0]
        if wanted.strip().isdigit() and int(wanted) < len(names):
            return int(wanted)
    listed = ", ".join(f"{i}: {n!r}" for i, n in enumerate(names)) or "(none)"
    raise InputFileError(
        f"{book.path.name}: sheet {wanted!r} not found; sheets: {listed}",
        "pass --sheet with one of these names, or its 0-based index, or --sheet all",
    )


def choose_sheets(book: Workbook, options: InputOptions, notes: list[str]) -> list[SheetPlan]:
    """The sheets to read, in workbook order, each surveyed. Raises InputFileError."""
    file = book.path.name
    if options.sheet is not None and not (isinstance(options.sheet, str)
                                          and options.sheet.strip().casefold() == SHEET_ALL):
        i = _find_sheet(book, options.sheet)
        plan = _plan(book, i, options)
        if isinstance(plan, InputFileError):
            raise plan
        notes.append(f"sheet {plan.name!r}: {_n_rows(plan.rows)} (given with --sheet"
                     + ("; it is hidden in the workbook)" if plan.hidden else ")"))
        return [plan]

    plans: list[SheetPlan] = []
    tried: list[str] = []
    first_error: InputFileError | None = None
    # Planned last to first, so that the sheet kept loaded (see Workbook.load) is the one read first.
    planned = [(i, _plan(book, i, options)) for i in reversed(range(len(book.names))) if book.is_worksheet(i)]
    for i, plan in reversed(planned):
        if isinstance(plan, InputFileError):
            first_error = first_error or plan
            header = getattr(plan, "header", None)
            shown = ", ".join(repr(c) for c in header) or "(empty)" if header is not None else None
            tried.append(f"{book.names[i]!r}: {shown if shown is not None else f'no row {options.header_row}'}")
            continue
        plans.append(plan)
    visible = [p for p in plans if not p.hidden]
    hidden = [p for p in plans if p.hidden]
    census = _sheet_census(book, planned)
    hidden_note = (
        f"hidden sheet{'s' if len(hidden) > 1 else ''} {', '.join(p.described() for p in hidden)} "
        f"hold{'' if len(hidden) > 1 else 's'} the columns too but {'were' if len(hidden) > 1 else 'was'} "
        "not read: hidden sheets are read only when named with --sheet"
    ) if hidden else None
    if not visible:
        if hidden:
            raise _with_census(census, InputFileError(
                f"{file}: no visible sheet holds the {CARD_FIELD} and {EXTERNAL_ID_FIELD} columns on "
                f"row {options.header_row}; {hidden_note}",
                f"if that sheet holds the rows to send, name it: --sheet {hidden[0].name!r}",
            ))
        if len(tried) == 1 and first_error is not None:
            raise _with_census(census, first_error)
        raise _with_census(census, InputFileError(
            f"{file}: no sheet holds the {CARD_FIELD} and {EXTERNAL_ID_FIELD} columns on row "
            f"{options.header_row}; headers found: " + ("; ".join(tried) or "(no worksheets)"),
            "pick the sheet with --sheet NAME and map the columns with --card-column NAME and "
            "--external-id-column NAME (and --header-row N if the headers are lower down)",
        ))
    if options.sheet is None and len(visible) > 1:
        raise _with_census(census, InputFileError(
            f"{file}: {len(visible)} sheets hold the {CARD_FIELD} and {EXTERNAL_ID_FIELD} columns: "
            + ", ".join(p.described() for p in visible)
            + (f"; {hidden_note}" if hidden_note else ""),
            f"read one with --sheet NAME or --sheet INDEX (e.g. --sheet {visible[-1].name!r}), or "
            "all of them, in workbook order, with --sheet all",
        ))
    if len(visible) > 1:
        try:
            _same_columns(file, visible)
        except InputFileError as exc:
            raise _with_census(census, exc) from None
        notes.append("sheets (--sheet all, in workbook order): "
                     + ", ".join(f"{p.name!r} ({_n_rows(p.rows)})" for p in visible)
                     + f"; {_n_rows(sum(p.rows for p in visible))} in all")
    elif options.sheet is None:
        notes.append(f"sheet {visible[0].name!r}: {_n_rows(visible[0].rows)} (the only visible sheet with "
                     "the required headers)")
    else:
        notes.append(f"sheet {visible[0].name!r}: {_n_rows(visible[0].rows)} (--sheet all: the only "
                     "visible sheet with the required headers)")
    if hidden_note:
        notes.append(hidden_note)
    return visible


def _sheet_census(book: Workbook, planned: list[tuple[int, SheetPlan | InputFileError]]) -> list[dict[str, Any]]:
    """Every worksheet, in workbook order: whether it holds the required columns, its data rows if so,
    and the header row found (what ``validate --json`` shows beside a refusal)."""
    out = []
    for i, plan in sorted(planned, key=lambda item: item[0]):
        ok = isinstance(plan, SheetPlan)
        header = plan.header if ok else getattr(plan, "header", None)
        out.append({"index": i, "name": book.names[i], "hidden": book.is_hidden(i), "has_columns": ok,
                    "rows": plan.rows if ok else None, "header": list(header) if header is not None else None})
    return out


def _with_census(census: list[dict[str, Any]], error: InputFileError) -> InputFileError:
    error.details["sheet_census"] = census
    return error


def _same_columns(file: str, plans: list[SheetPlan]) -> None:
    first = plans[0]
    want = [normalize_header(c) for c in first.header]
    for p in plans[1:]:
        if [normalize_header(c) for c in p.header] != want:
            raise InputFileError(
                f"{file}: --sheet all needs the same columns on every sheet, but sheet {p.name!r} has "
                f"{', '.join(repr(c) for c in p.header)} and sheet {first.name!r} has "
                f"{', '.join(repr(c) for c in first.header)}",
                "give the sheets the same columns in the same order, or run each sheet on its own "
                "with --sheet NAME",
            )


class WorkbookReader:
    """batches(): the chosen sheets' data rows, one sheet in memory at a time."""

    def __init__(self, book: Workbook, plans: list[SheetPlan], header_row: int) -> None:
        self.book = book
        self.plans = plans
        self.header_row = header_row

    def rows(self) -> Iterator[SourceRow]:
        for batch in self.batches():
            yield from batch.rows()

    def batches(self, structure: bool = False) -> Iterator[RowBatch]:
        for plan in self.plans:
            yield from _SheetReader(self.book, plan).batches(self.header_row)

    def structure_notes(self) -> list[str]:
        return []


class _SheetReader:
    """One sheet's data rows as batches. A batch whose key cells are all plain (text, or whole numbers
    under one plain-digits format) is built column by column; any other goes row by row through
    :func:`workbook_key`."""

    def __init__(self, book: Workbook, plan: SheetPlan) -> None:
        self.book = book
        self.plan = plan
        self.width = len(plan.header)
        self.key_cols = (plan.col0 + plan.card_idx, plan.col0 + plan.ext_idx)
        self._facts: Any = None
        self._loaded = False

    def facts(self) -> Any:
        if not self._loaded:
            self._facts = self.book.engine.facts(self.plan.name, set(self.key_cols))
            self._loaded = True
        return self._facts

    def batches(self, header_row: int) -> Iterator[RowBatch]:
        sheet = self.book.load(self.plan.name)
        rows = sheet.iter_rows()
        deque(islice(rows, header_row), maxlen=0)
        first = header_row  # 0-based index of the chunk's first row
        while chunk := list(islice(rows, BATCH_ROWS)):
            batch = self._by_column(chunk, first)
            if batch is None:
                batch = next(batches_of(self._by_row(chunk, first), size=len(chunk)), None)
            if batch is not None and len(batch):
                yield batch
            first += len(chunk)
        del sheet

    def _by_column(self, chunk: list[list[Any]], first: int) -> RowBatch | None:
        """The chunk as a batch built column by column, or None when a key cell needs a closer look."""
        plan, width = self.plan, self.width
        if min(map(len, chunk)) < width:
            return None
        last = first + len(chunk) - 1
        columns = list(islice(zip(*chunk), width))
        cards = self._plain_keys(columns[plan.card_idx], self.key_cols[0], first, last, blank_ok=False)
        if cards is None:
            return None
        exts = self._plain_keys(columns[plan.ext_idx], self.key_cols[1], first, last, blank_ok=True)
        if exts is None:
            return None
        keys = {plan.card_idx: cards, plan.ext_idx: exts}
        columns = [keys[j] if j in keys else display_texts(c) for j, c in enumerate(columns)]
        return RowBatch(plan.name, range(first + 1, last + 2), list(zip(*columns)), list(cards), list(exts),
                        {}, {})

    def _plain_keys(self, values: tuple[Any, ...], col: int, first: int, last: int,
                    blank_ok: bool) -> Any:
        """The key texts of a column when none has a problem and none needs a cell-level fact (an empty
        cell is allowed with ``blank_ok`` when the file says it holds no error or formula); else None."""
        kinds = set(map(type, values))
        if kinds <= {str}:
            if "" not in values:
                return values
            if not blank_ok:
                return None
            facts = self.facts()
            if facts and any(facts.special((first + i, col)) is not None
                             for i, v in enumerate(values) if not v):
                return None
            return values
        if not kinds <= {int, float}:
            return None
        if self.book.engine.numbers_plain:
            return render_whole_numbers(values, GENERAL)
        facts = self.facts()
        display_range = getattr(facts, "display_range", None)
        shown = display_range(first, last, col) if display_range else None
        return render_whole_numbers(values, shown) if shown is not None else None

    def _by_row(self, chunk: list[list[Any]], first: int) -> Iterator[SourceRow]:
        plan, width = self.plan, self.width
        engine = self.book.engine
        ci, ei = plan.card_idx, plan.ext_idx
        key_cols = self.key_cols
        get_facts = self.facts

        def key(v: Any, label: str, row0: int, col: int) -> tuple[str, Any]:
            if type(v) is str:
                if v:
                    return v, None
                f = get_facts()
                return workbook_key(v, label, special=f.special((row0, col)) if f else None)
            if type(v) is bool or not isinstance(v, (int, float)):
                return workbook_key(v, label)
            if engine.numbers_plain:
                return workbook_key(v, label, GENERAL)
            f = get_facts()
            return workbook_key(v, label, f.display(row0, col) if f else UNREADABLE_FORMAT)

        name = plan.name
        text = display_text
        for i, raw in enumerate(chunk, first):
            cells = raw[:width]
            if len(cells) < width:
                cells = list(cells) + [""] * (width - len(cells))
            card_v = cells[ci]
            ext_v = cells[ei]
            if type(card_v) is str and type(ext_v) is str and card_v and ext_v:
                card, card_problem, ext, ext_problem = card_v, None, ext_v, None
            else:
                if not any(c != "" for c in cells):
                    f = get_facts()
                    if not f or (f.special((i, key_cols[0])) is None and f.special((i, key_cols[1])) is None):
                        continue  # a blank row
                card, card_problem = key(card_v, "card number", i, key_cols[0])
                ext, ext_problem = key(ext_v, "external id", i, key_cols[1])
            values = [v if type(v) is str else text(v) for v in cells]
            values[ci] = card
            values[ei] = ext
            yield SourceRow(name, i + 1, tuple(values), card, ext, card_problem, ext_problem)


def open_workbook(path: Path, fmt: str, options: InputOptions, notes: list[str]) -> tuple[WorkbookReader, list[SheetPlan]]:
    book = Workbook(path, fmt)
    plans = choose_sheets(book, options, notes)
    return WorkbookReader(book, plans, options.header_row), plans
