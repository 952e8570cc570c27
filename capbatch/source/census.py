"""The pass over the rows that ``open_input`` makes before anything is sent, whatever the format:
count the data rows, find rows that repeat the header, and collect what the notes must say."""

from __future__ import annotations

from collections.abc import Sequence

from capbatch.errors import InputFileError

from .cells import TRIMMED, unwrap_formula_text
from .headers import HeaderEcho
from .model import CARD_FIELD, EXTERNAL_ID_FIELD

_LISTED = 5


def _label(sheet: str | None, row_number: int) -> str:
    return f"{sheet}!{row_number}" if sheet else str(row_number)


def _rows(labels: list[str], total: int) -> str:
    more = f" and {total - len(labels)} more" if total > len(labels) else ""
    return ("row " if total == 1 else "rows ") + ", ".join(labels) + more


class Census:
    """Fed every non-blank row (key cells as text; '' for a typed cell) by a reader's open pass."""

    def __init__(self, echo: HeaderEcho, file_name: str) -> None:
        self._echo = echo
        self._file = file_name
        self.count = 0
        self.skip: set[tuple[str | None, int]] = set()  # repeated header rows: not data
        self._echo_labels: list[str] = []
        self._wrapped = 0
        self._wrapped_labels: list[str] = []

    def fresh(self) -> Census:
        """A census of the same header that has seen nothing yet."""
        return Census(self._echo, self._file)

    def see(self, sheet: str | None, row_number: int, card: str, ext: str) -> bool:
        """True when the row is data; False for a repeated header (rows() skips it)."""
        if card and not card[0].isdigit():  # a card number that starts with a digit is no header
            kind = self._echo.kind(card, ext)
        else:
            kind = None
        if kind == "same":
            self.skip.add((sheet, row_number))
            if len(self._echo_labels) < _LISTED:
                self._echo_labels.append(_label(sheet, row_number))
            return False
        if kind == "swapped":
            raise InputFileError(
                f"{self._file}: row {_label(sheet, row_number)} repeats the header row with the "
                f"{CARD_FIELD} and {EXTERNAL_ID_FIELD} columns in another order ({card!r}, "
                f"{ext!r}): the rows after it would be read into the wrong columns",
                "the file looks like two exports with different column orders joined together; "
                "export them with the same columns, or split the file at that row and run each part",
            )
        self.count += 1
        if ('="' in card and unwrap_formula_text(card.strip(TRIMMED)) is not None) or (
            '="' in ext and unwrap_formula_text(ext.strip(TRIMMED)) is not None
        ):
            self._wrapped += 1
            if len(self._wrapped_labels) < _LISTED:
                self._wrapped_labels.append(_label(sheet, row_number))
        return True

    def see_batch(self, sheet: str | None, row_numbers: Sequence[int], cards: list[str],
                  exts: list[str]) -> None:
        """see() for consecutive non-blank rows. A row whose card number is empty or starts with a digit
        and that holds no ``="`` is plain data: it is only counted (see() would do no more)."""
        look: set[int] = set()
        joined = "".join(cards)
        if not (joined.encode("ascii").isdigit() if joined.isascii() else joined.isdigit()):
            look.update(i for i, c in enumerate(cards) if c and not c[0].isdigit())
        for column in (cards, exts):
            if '="' in "\n".join(column):  # the separator keeps a match inside one cell
                look.update(i for i, v in enumerate(column) if '="' in v)
        self.count += len(cards) - len(look)
        for i in sorted(look):
            self.see(sheet, row_numbers[i], cards[i], exts[i])

    def notes(self) -> list[str]:
        out = []
        if self.skip:
            out.append(
                f"{_rows(self._echo_labels, len(self.skip))} repeat the header row (files joined "
                "together?) and were skipped: they are not data"
                if len(self.skip) > 1 else
                f"{_rows(self._echo_labels, 1)} repeats the header row (files joined together?) "
                "and was skipped: it is not data"
            )
        if self._wrapped:
            out.append(
                f'{_rows(self._wrapped_labels, self._wrapped)}: ="..." (the spreadsheet way to keep '
                "leading zeros in a CSV) unwrapped to the text inside, which is what the "
                "spreadsheet shows"
            )
        return out
