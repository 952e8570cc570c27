"""In-memory inputs: a pandas DataFrame, or an iterable of (card, external_id) pairs or of mappings.

They are read like a file: the same header matching, and ``rows()`` yields the same
:class:`~capbatch.source.SourceRow` objects the file readers yield, so the same rules, ledger and
reports follow. A cell is text or missing (``None``, ``NaN``, ``pd.NA``, ``NaT``); a key column that
holds numbers is refused as a whole (its leading zeros and digits beyond 15 are already gone), and a
number inside a text column is a per-row problem for the same reason.

pandas is imported only when a DataFrame is actually given: the CLI never pays for it.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Iterator

from capbatch.errors import InputFileError, UsageError
from capbatch.source import (
    CARD_FIELD,
    EXTERNAL_ID_FIELD,
    CellProblem,
    InputOptions,
    SourceRow,
    _resolve_columns,  # header matching shared with the file readers
)

__all__ = ["MemoryTable", "is_dataframe", "open_frame", "open_records"]

NOT_TEXT = "not_text"
_KEY_LABELS = ("card number", "external id")


def is_dataframe(obj: object) -> bool:
    """True for a pandas DataFrame, without importing pandas (an object cannot be one unless it is loaded)."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(obj, pd.DataFrame)


def _missing(value: object) -> bool:
    """None, NaN, pd.NA and NaT: what pandas and Python code mean by "no value"."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    return type(value).__name__ in ("NAType", "NaTType")


def _text(value: object) -> str:
    if type(value) is str:
        return value
    return "" if _missing(value) else str(value)


class MemoryTable:
    """An in-memory input, opened and checked; ``rows()`` streams SourceRow objects (each call restarts).

    Carries the attributes of :class:`~capbatch.source.InputTable` the pipeline reads (``columns``,
    ``card_column``, ``external_id_column``, ``notes``, ``sheet``/``delimiter``/``encoding`` = None).
    """

    path = None
    sheet = None
    delimiter = None
    encoding = None

    def __init__(self, kind: str, columns: list[str], cells: list[list[Any]], labels: Sequence[int],
                 keys: tuple[int, int], notes: list[str]) -> None:
        self.format = kind                 # "dataframe" | "records"
        self.columns = columns
        self._cells = cells                # one list of Python values per column
        self._labels = labels              # the row label reported for each row
        self._card_idx, self._ext_idx = keys
        self.card_column = columns[keys[0]]
        self.external_id_column = columns[keys[1]]
        self.notes = notes
        self.row_count = len(labels)
        self._sha256: str | None = None

    def __repr__(self) -> str:
        return f"MemoryTable(format={self.format!r}, rows={self.row_count}, columns={self.columns!r})"

    @property
    def name(self) -> str:
        """How the input is named in the ledger, messages and the default run directory."""
        return "dataframe" if self.format == "dataframe" else "records"

    def rows(self) -> Iterator[SourceRow]:
        ci, ei = self._card_idx, self._ext_idx
        where = "in the DataFrame" if self.format == "dataframe" else "in the input"
        for label, cells in zip(self._labels, zip(*self._cells)):
            values = [_text(v) for v in cells]
            card_problem = _not_text(cells[ci], values[ci], _KEY_LABELS[0], where)
            ext_problem = _not_text(cells[ei], values[ei], _KEY_LABELS[1], where)
            yield SourceRow(None, label, tuple(values), values[ci], values[ei], card_problem, ext_problem)

    def sha256(self) -> str:
        """A fingerprint of the content (labels, column names, every cell as the rows carry it):
        the same data gives the same run directory and resumes it, whatever object it came in."""
        if self._sha256 is None:
            h = hashlib.sha256()
            h.update("\x1f".join(self.columns).encode("utf-8", "surrogatepass"))
            for row in self.rows():
                h.update(b"\x1e%d\x1d" % row.row_number)
                h.update("\x1f".join(row.values).encode("utf-8", "surrogatepass"))
                for problem in (row.card_problem, row.external_id_problem):
                    if problem:
                        h.update(b"\x1d" + str(problem).encode("utf-8", "surrogatepass"))
            self._sha256 = h.hexdigest()
        return self._sha256


def _not_text(value: object, text: str, label: str, where: str) -> CellProblem | None:
    if type(value) is str or isinstance(value, str) or _missing(value):
        return None
    kind = "logical value" if isinstance(value, bool) else type(value).__name__
    return CellProblem(
        NOT_TEXT,
        f"{label} {text!r} is a {kind} {where}, not text: leading zeros and digits beyond 15 may already "
        "be lost; build the column from text (read the file with dtype=str) or take the value from the "
        "source system",
    )


def _columns_or_error(columns: list[str], options: InputOptions, where: str) -> tuple[int, int]:
    found = _resolve_columns(columns, options, where)
    if isinstance(found, InputFileError):
        found.hint = ("name the columns with card_column= and external_id_column=, or rename them to "
                      f"{CARD_FIELD} and {EXTERNAL_ID_FIELD}")
        raise found
    return found


def _no_rows(what: str) -> InputFileError:
    return InputFileError(f"the {what} has no rows: nothing to send",
                          "check the step that produced it (an empty export is usually a broken one)")


# ---- pandas.DataFrame -------------------------------------------------------------------------------
def open_frame(df: Any, options: InputOptions = InputOptions()) -> MemoryTable:
    """Check a DataFrame's columns and keep its cells; raises InputFileError for a numeric key column."""
    import pandas as pd

    if len(df.index) == 0:
        raise _no_rows("DataFrame")
    notes: list[str] = []
    columns = [str(c) for c in df.columns]
    cells = [df.iloc[:, j].tolist() for j in range(len(columns))]
    index = df.index
    if pd.api.types.is_integer_dtype(index.dtype) and index.is_unique and index.nlevels == 1:
        labels: Sequence[int] = [int(v) for v in index.tolist()]
        extra: list[str] = []
    else:
        # Labels that are not unique whole numbers cannot be a row number: rows are numbered by position
        # (as df.iloc counts) and the index travels with them as leading columns of every report.
        labels = range(len(index))
        extra = [str(n) if n is not None else ("index" if index.nlevels == 1 else f"level_{i}")
                 for i, n in enumerate(index.names)]
        levels = [index.get_level_values(i).tolist() for i in range(index.nlevels)]
        columns, cells = extra + columns, levels + cells
        notes.append(f"rows are numbered by position from 0 (the DataFrame's index is not unique whole "
                     f"numbers); its values are kept as column(s) {', '.join(map(repr, extra))}")
    keys = _columns_or_error(columns, options, "DataFrame")
    for at in keys:
        _refuse_numbers(df.iloc[:, at - len(extra)] if at >= len(extra) else None, columns[at])
    notes.insert(0, f"columns: {CARD_FIELD} <- {columns[keys[0]]!r}, {EXTERNAL_ID_FIELD} <- {columns[keys[1]]!r}")
    notes.insert(1, f"DataFrame: {len(labels)} rows, {len(df.columns)} columns")
    return MemoryTable("dataframe", columns, cells, labels, keys, notes)


def _refuse_numbers(column: Any, name: str) -> None:
    """A key column of numbers, dates or logical values lost the user's text before we saw it."""
    import pandas as pd

    if column is None:
        return
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        dtype = dtype.categories.dtype
    if dtype == object or pd.api.types.is_string_dtype(dtype) or column.isna().all():
        return
    raise InputFileError(
        f"DataFrame column {name!r} holds {dtype} values, not text: leading zeros and digits beyond 15 "
        "are already lost, so the values cannot be sent as the user typed them",
        "build the DataFrame from text: pd.read_csv(path, dtype=str) or pd.read_excel(path, dtype=str) "
        "(astype(str) afterwards cannot bring lost zeros back)",
    )


# ---- iterables of pairs or mappings ------------------------------------------------------------------
def open_records(items: Iterable[Any], options: InputOptions = InputOptions()) -> MemoryTable:
    """Pairs ``(card, external_id)`` or mappings (``{"cardNumber": ..., "cardExternalId": ...}``),
    numbered by position from 0 (as ``pandas.DataFrame(items)`` would number them)."""
    items = list(items)
    if not items:
        raise _no_rows("input")
    first = items[0]
    if isinstance(first, Mapping):
        columns: list[str] = []
        seen: set[Any] = set()
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise _mixed(i, item, "a mapping like item 0")
            for key in item:
                if key not in seen:
                    seen.add(key)
                    columns.append(key)
        cells = [[item.get(key) for item in items] for key in columns]
        names = [str(c) for c in columns]
        keys = _columns_or_error(names, options, "input mappings")
    elif _is_pair(first):
        for i, item in enumerate(items):
            if not _is_pair(item):
                raise _mixed(i, item, "a (card, external_id) pair like item 0")
        names = [CARD_FIELD, EXTERNAL_ID_FIELD]
        cells = [[item[0] for item in items], [item[1] for item in items]]
        keys = (0, 1)
    else:
        raise _mixed(0, first, "a (card, external_id) pair or a mapping")
    notes = [f"input: {len(items)} {'mappings' if isinstance(first, Mapping) else 'pairs'}",
             f"columns: {CARD_FIELD} <- {names[keys[0]]!r}, {EXTERNAL_ID_FIELD} <- {names[keys[1]]!r}"]
    return MemoryTable("records", names, cells, range(len(items)), keys, notes)


def _is_pair(item: object) -> bool:
    return isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2


def _mixed(i: int, item: object, wanted: str) -> UsageError:
    shown = repr(item) if len(repr(item)) <= 60 else repr(item)[:59] + "\u2026"
    return UsageError(f"input item {i} is {shown} ({type(item).__name__}), not {wanted}",
                      "pass a path, a pandas.DataFrame, or an iterable of (card, external_id) pairs or of "
                      "mappings with cardNumber and cardExternalId keys")
