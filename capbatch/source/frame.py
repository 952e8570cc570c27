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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from capbatch.errors import InputFileError, UsageError

from .headers import resolve_columns
from .model import CARD_FIELD, EXTERNAL_ID_FIELD, CellProblem, InputOptions, RowBatch, SourceRow

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
        self._labels = labels              # the row label reported for each row
        self._card_idx, self._ext_idx = keys
        self.card_column = columns[keys[0]]
        self.external_id_column = columns[keys[1]]
        self.notes = notes
        self.row_count = len(labels)
        self.numbered_by_position = isinstance(labels, range)   # True when labels are not the index's
        # Cells become text once, column by column (a str cell is kept as the same object).
        self._texts = [[v if type(v) is str else _text(v) for v in column] for column in cells]
        where = "in the DataFrame" if kind == "dataframe" else "in the input"
        self._problems = [{i: p for i, v in enumerate(cells[at]) if type(v) is not str
                           and (p := _not_text(v, self._texts[at][i], label, where))}
                          for at, label in zip(keys, _KEY_LABELS)]
        self._sha256: str | None = None

    def __repr__(self) -> str:
        return f"MemoryTable(format={self.format!r}, rows={self.row_count}, columns={self.columns!r})"

    @property
    def name(self) -> str:
        """How the input is named in the ledger, messages and the default run directory."""
        return "dataframe" if self.format == "dataframe" else "records"

    def rows(self) -> Iterator[SourceRow]:
        for batch in self.batches():
            yield from batch.rows()

    def batches(self, size: int = 10_000) -> Iterator[RowBatch]:
        ci, ei = self._card_idx, self._ext_idx
        card_problems, ext_problems = self._problems
        for start in range(0, self.row_count, size):
            end = min(self.row_count, start + size)
            columns = [texts[start:end] for texts in self._texts]
            yield RowBatch(None, self._labels[start:end], list(zip(*columns)), columns[ci], columns[ei],
                           {i - start: p for i, p in card_problems.items() if start <= i < end},
                           {i - start: p for i, p in ext_problems.items() if start <= i < end})

    def sha256(self) -> str:
        """A fingerprint of the content (column names, row labels, every cell's text and which key cells
        are not text): the same data gives the same run directory and resumes it, whatever object it
        came in (a DataFrame of any string dtype, a list of pairs)."""
        if self._sha256 is None:
            h = hashlib.sha256()
            for part in (self.columns, map(str, self._labels), *self._texts):
                h.update("\x1f".join(part).encode("utf-8", "surrogatepass") + b"\x1e")
            for problems in self._problems:
                h.update(repr(sorted(problems.items())).encode("utf-8", "surrogatepass") + b"\x1e")
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
    found = resolve_columns(columns, options, where)
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
