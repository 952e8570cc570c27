"""Delimited text (CSV, TSV, ...): the delimiter, the header, one structural pass, then the rows.

Read with the stdlib ``csv`` module (measured ~2-4x faster than ``pandas.read_csv(dtype=str,
chunksize=...)`` once rows are turned into Python tuples, and it gives exact record-level row
numbers: one record = one row, blank lines included). Every cell is text; nothing converts types.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from pathlib import Path

from capbatch.errors import InputFileError, UsageError

from .census import Census
from .encoding import choose_encoding
from .headers import HeaderEcho, resolve_columns
from .model import CellProblem, InputOptions, RowBatch, SourceRow

_DELIMITERS = (",", ";", "\t", "|")
DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
_DELIMITER_WORDS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
_SAMPLE_CHARS = 256 * 1024


@dataclass(frozen=True)
class Layout:
    """What the open pass found, and rows() needs."""

    encoding: str
    delimiter: str
    header: list[str]
    card_idx: int
    ext_idx: int
    header_row: int


def _read_sample(path: Path, encoding: str) -> str:
    with open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding=encoding, errors="strict", newline="")
        return text.read(_SAMPLE_CHARS)


def _sample_records(sample: str, delimiter: str, complete: bool) -> list[list[str]]:
    reader = csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter, strict=False)
    recs: list[list[str]] = []
    try:
        for rec in reader:
            recs.append(rec)
    except csv.Error:
        pass
    if not complete and len(recs) > 1:
        recs.pop()  # may be cut in the middle
    return recs


def _candidates(options: InputOptions) -> list[str]:
    if options.delimiter is None:
        return list(_DELIMITERS)
    delim = _DELIMITER_WORDS.get(options.delimiter.lower(), options.delimiter)
    if len(delim) != 1 or delim in "\"\r\n":
        raise UsageError(
            f"invalid delimiter {options.delimiter!r}",
            "use one character, e.g. --delimiter ';' or --delimiter tab",
        )
    return [delim]


def open_delimited(path: Path, options: InputOptions, notes: list[str],
                   survey: bool = True) -> tuple[Layout, Census]:
    """Decide encoding, delimiter and columns, then check the whole file's structure (``survey``;
    else the census is returned unfed, for the reader's first pass)."""
    enc = choose_encoding(path, options, notes)
    sample = _read_sample(path, enc)
    complete = len(sample) < _SAMPLE_CHARS
    hr = options.header_row
    best = None
    for d in _candidates(options):
        recs = _sample_records(sample, d, complete)
        if len(recs) < hr:
            continue
        header = recs[hr - 1]
        if header:
            header[0] = header[0].lstrip("\ufeff")
        res = resolve_columns(header, options, path.name)
        ok = not isinstance(res, InputFileError)
        body = [r for r in recs[hr:] if any(r)][:200]
        consistent = sum(1 for r in body if len(r) == len(header))
        score = (ok, len(header) > 1, consistent, len(header))
        if best is None or score > best[0]:
            best = (score, d, header, res)
    if best is None:
        raise InputFileError(
            f"{path.name}: the file has fewer than {hr} rows, so there is no header on row {hr}",
            "check --header-row (the 1-based row holding the column names)",
        )
    _, delim, header, res = best
    if isinstance(res, InputFileError):
        if options.delimiter is None and len(header) <= 1:
            res.hint = (res.hint or "") + (
                "; the header row could not be split on , ; tab or | - pass --delimiter if the "
                "file uses another separator"
            )
        raise res
    layout = Layout(enc, delim, header, res[0], res[1], hr)
    how = "given with --delimiter" if options.delimiter is not None else "detected"
    notes.append(f"delimiter: {DELIMITER_NAMES.get(delim, repr(delim))} ({how})")
    census = Census(HeaderEcho(header, res[0], res[1], options), path.name)
    if survey:
        _check_structure(path, layout, census, notes)
    return layout, census


BATCH_ROWS = 10_000  # records parsed per C-level call (islice) on both passes


def _check_structure(path: Path, layout: Layout, census: Census, notes: list[str]) -> None:
    """One full pass with the real parser: broken quoting is found before anything is sent."""
    try:
        multiline = _survey(path, layout, census)
    except csv.Error:
        _raise_quoting_error(path, layout)
        raise
    notes.extend(_multiline_note(multiline))


def _multiline_note(multiline: list[int]) -> list[str]:
    if not multiline:
        return []
    rows = ", ".join(str(r) for r in multiline)
    return [f"some cells contain line breaks inside quotes (rows {rows}"
            f"{', ...' if len(multiline) == 5 else ''}); each such record counts as one row"]


def _note_multiline(multiline: list[int], first: int, recs: list[list[str]], header_row: int) -> None:
    """Add the first rows below the header that were read from more than one line (up to 5): only a
    quoted cell can hold a line break. Called for a batch that took more lines than records."""
    if len(multiline) < 5:
        multiline += [n for n, rec in enumerate(recs, first)
                      if n > header_row and any("\n" in c or "\r" in c for c in rec)]
        del multiline[5:]


def _survey(path: Path, layout: Layout, census: Census) -> list[int]:
    """Feed the census every data record, a batch at a time; the first rows that span lines."""
    multiline: list[int] = []
    ci, ei, hr = layout.card_idx, layout.ext_idx, layout.header_row
    keys = max(ci, ei)
    card_of, ext_of = itemgetter(ci), itemgetter(ei)
    see = census.see
    with open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding=layout.encoding, errors="strict", newline="")
        reader = csv.reader(text, delimiter=layout.delimiter, strict=True)
        rn = last_line = 0
        while recs := list(islice(reader, BATCH_ROWS)):
            first = rn + 1
            rn += len(recs)
            if reader.line_num - last_line > len(recs):
                _note_multiline(multiline, first, recs, hr)
            last_line = reader.line_num
            if first <= hr:
                recs = recs[hr - first + 1:]
                first = hr + 1
            if min(map(len, recs), default=0) > keys:
                cards = list(map(card_of, recs))
                if all(cards) or all(map(any, recs)):  # no blank record
                    census.see_batch(None, range(first, first + len(recs)), cards, list(map(ext_of, recs)))
                    continue
            for n, rec in enumerate(recs, first):
                if any(rec):
                    k = len(rec)
                    see(None, n, rec[ci] if ci < k else "", rec[ei] if ei < k else "")
    return multiline


def _raise_quoting_error(path: Path, layout: Layout) -> None:
    """Find the record the parser choked on, record by record, and say where it starts."""
    with open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding=layout.encoding, errors="strict", newline="")
        reader = csv.reader(text, delimiter=layout.delimiter, strict=True)
        rn = last_line = 0
        while True:
            try:
                next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise InputFileError(
                    f"{path.name}: broken quoting in row {rn + 1} (starting at line "
                    f"{last_line + 1}): {e}",
                    "a cell has an opening quote (\") that is never closed, or text after a "
                    "closing quote; fix the quotes in that row (a quote inside a quoted cell is "
                    "written as two quotes \"\") and run again",
                ) from None
            rn += 1
            last_line = reader.line_num


class DelimitedReader:
    """batches(): every record below the header (blank records skipped), a batch at a time."""

    def __init__(self, path: Path, layout: Layout) -> None:
        self.path = path
        self.layout = layout
        self._multiline: list[int] = []

    def rows(self) -> Iterator[SourceRow]:
        for batch in self.batches():
            yield from batch.rows()

    def structure_notes(self) -> list[str]:
        """After batches(structure=True): what the structural pass has to say."""
        return _multiline_note(self._multiline)

    def batches(self, structure: bool = False) -> Iterator[RowBatch]:
        """``structure``: this is the file's structural pass (open_input(survey=False)): broken
        quoting is reported as such, and the rows read from several lines are noted."""
        lay = self.layout
        width = len(lay.header)
        ci, ei = lay.card_idx, lay.ext_idx
        card_of, ext_of = itemgetter(ci), itemgetter(ei)
        header_row = lay.header_row
        self._multiline = []
        try:
            with open(self.path, "rb") as raw:
                text = io.TextIOWrapper(raw, encoding=lay.encoding, errors="strict", newline="")
                reader = csv.reader(text, delimiter=lay.delimiter, strict=True)
                rn = last_line = 0
                while recs := list(islice(reader, BATCH_ROWS)):
                    first = rn + 1
                    rn += len(recs)
                    if structure and reader.line_num - last_line > len(recs):
                        _note_multiline(self._multiline, first, recs, header_row)
                    last_line = reader.line_num
                    if first <= header_row:
                        recs = recs[header_row - first + 1:]
                        first = header_row + 1
                        if not recs:
                            continue
                    if set(map(len, recs)) == {width}:  # the common case: complete records ...
                        cards = list(map(card_of, recs))
                        if all(cards) or all(map(any, recs)):  # ... none of them blank
                            yield RowBatch(None, range(first, rn + 1), recs, cards, list(map(ext_of, recs)),
                                           {}, {})
                            continue
                    yield self._uneven(first, recs)
        except UnicodeDecodeError as e:  # the file changed since open_input validated it
            raise InputFileError(
                f"{self.path.name}: cannot be decoded as {lay.encoding} ({e.reason})",
                "the file changed while it was being read; run again on a stable copy",
            ) from e
        except csv.Error as e:
            if structure:
                _raise_quoting_error(self.path, lay)
            raise InputFileError(
                f"{self.path.name}: malformed quoting: {e}",
                "the file changed while it was being read; run again on a stable copy",
            ) from e

    def _uneven(self, first: int, recs: list[list[str]]) -> RowBatch:
        """A batch with blank, short or long records: each is looked at on its own."""
        lay = self.layout
        width = len(lay.header)
        ci, ei = lay.card_idx, lay.ext_idx
        empty = [""] * width
        numbers: list[int] = []
        values: list[Sequence[str]] = []
        problems: dict[int, str] = {}
        for rn, rec in enumerate(recs, first):
            if not any(rec):
                continue
            n = len(rec)
            if n < width:
                rec.extend(empty[: width - n])
            elif n > width:
                if any(rec[width:]):
                    problems[len(values)] = CellProblem(
                        "extra_cells",
                        f"row has {n} cells but the header has {width} columns: a value "
                        "probably contains an unquoted "
                        f"{DELIMITER_NAMES.get(lay.delimiter, repr(lay.delimiter))} "
                        "(delimiter), so the columns are shifted; put quotes around that "
                        "value or remove the extra cells",
                    )
                else:
                    del rec[width:]
            numbers.append(rn)
            values.append(rec)
        return RowBatch(None, numbers, values, [v[ci] for v in values], [v[ei] for v in values],
                        problems, {})
