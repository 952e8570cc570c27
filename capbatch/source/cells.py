"""Cell rules: the one place that decides whether a key cell's text may be sent, whatever the format.

A card number or external ID reaches the API only as the exact text the user sees. Two kinds of
cell arrive here:

* text, from any format (a CSV field, a workbook string cell, a rendered number): trimmed of
  spaces, non-breaking spaces and TABs at the ends, then refused when it is a placeholder, an
  Excel error literal (``#N/A``, ``#REF!``, ``########`` ...), Excel's scientific notation, a
  number with thousands separators (``1,234,567``) or a float rendering (``123.0``), or holds
  invisible characters. Excel's keep-as-text idiom
  ``="00123"`` is unwrapped to ``00123``;
* typed workbook values (numbers, dates, logical values, error cells, formulas without a cached
  value): a number is sent as the text it is displayed with, and only when that text is its
  digits (zero padding such as ``0000000000000000`` included). The displayed text is rendered from
  the number format for .xlsx/.xls (``General``, ``@``, ``0``, zero padding, grouping, fixed
  decimals; any other format is refused, naming it) and read from the file for .ods.

Readers call :func:`workbook_key` for typed cells; :func:`clean_text` runs (from ``rules``) on
every key cell of every format, so a rule for Excel cells is a rule for CSV text too.
"""

from __future__ import annotations

import datetime as _dt
import functools
import operator
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

from .model import CellProblem, show

__all__ = [
    "GENERAL",
    "PLACEHOLDERS",
    "TRIMMED",
    "UNREADABLE_FORMAT",
    "CellRejected",
    "NumberDisplay",
    "clean_text",
    "plain_texts",
    "display_text",
    "display_texts",
    "render_whole_numbers",
    "problem_code",
    "render_format",
    "unwrap_formula_text",
    "workbook_key",
]

# Space-like characters trimmed at both ends: every Unicode Zs (space, NBSP, figure space, narrow
# NBSP, en/em spaces, ideographic space...) and TAB. A TAB *inside* a value is still refused.
TRIMMED = " \t\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"

# Case-insensitive texts that mean "no value".
PLACEHOLDERS = frozenset({"na", "n/a", "null", "none", "nil", "-", "--", "?", "nan", "n.a."})

# What a spreadsheet shows instead of a value when a formula failed (Excel, and LibreOffice's
# Err:NNN), and the run of '#' Excel shows when a column is too narrow for its number.
_ERROR_LITERAL = re.compile(
    r"#(?:NULL!|DIV/0!|VALUE!|REF!|NAME\?|NUM!|N/A|SPILL!|CALC!|GETTING_DATA|FIELD!|BLOCKED!"
    r"|CONNECT!|BUSY!|UNKNOWN!|EXTERNAL!|PYTHON!)|#+|Err:\d{3}",
    re.IGNORECASE,
)
# Excel/float renderings of numbers: 4.11111E+15, 4,11111E+15, 1E+15, 4.1e15 (a bare 12E45 is
# left alone: it may be a genuine alphanumeric id).
_SCIENTIFIC = re.compile(r"[+-]?\d+(?:[.,]\d+[eE][+-]?\d+|[eE][+-]\d+)")
_FLOAT_RENDERING = re.compile(r"\d+\.0+")
# A number displayed with thousands separators (1,234,567): never a card number or an ID.
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# ="00123": Excel shows the text inside (a quote inside is written as two quotes).
_FORMULA_TEXT = re.compile(r'="((?:[^"]|"")*)"')
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})

MAX_EXACT_DIGITS = 15  # Excel keeps 15 significant digits; a longer number cannot be trusted.
_AS_TEXT_FIX = ("format the column as Text and re-enter the values (or export them as text from "
                "the source system)")


class CellRejected(Exception):
    """A key cell whose text must not be sent: ``code`` (stable) and ``reason`` (for the user)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


# --------------------------------------------------------------------------------------------
# text, from every format


def unwrap_formula_text(value: str) -> str | None:
    """The text inside Excel's ``="..."`` keep-as-text idiom, or None when ``value`` is not one."""
    m = _FORMULA_TEXT.fullmatch(value)
    return m.group(1).replace('""', '"') if m else None


def _invisible_chars(value: str) -> list[str]:
    if value.isascii():
        return _ASCII_CONTROL.findall(value)
    cat = unicodedata.category
    return [c for c in value if cat(c) in _INVISIBLE_CATEGORIES]


# The longest placeholder made only of letters and digits ('null', 'none'): a longer alphanumeric text
# is never one.
_LONGEST_ALNUM_PLACEHOLDER = max(len(p) for p in PLACEHOLDERS if p.isalnum())


def plain_texts(texts: list[str], shortest: int | None = None) -> bool:
    """True when :func:`clean_text` returns every one of ``texts`` as it is, with no rule applying:
    each is non-empty ASCII letters and digits (nothing to trim, unwrap or refuse) and no placeholder.
    Checked with a few C-level passes over the whole list: the common case of a batch of rows.
    ``shortest``: the length of the shortest text, when the caller knows it."""
    joined = "".join(texts)
    if not (joined.isascii() and joined.encode("ascii").isalnum()):  # bytes: a table lookup per byte
        return False
    if shortest is None:
        shortest = min(map(len, texts))
    return shortest > 0 and (shortest > _LONGEST_ALNUM_PLACEHOLDER
                             or PLACEHOLDERS.isdisjoint(map(str.casefold, texts)))


def clean_text(raw: str, label: str, strip_invisible: bool = False) -> str:
    """The exact text to send for a key cell, or CellRejected. ``label``: 'card number' etc."""
    value = raw.strip(TRIMMED)
    if value.isascii() and value.isalnum() and value.casefold() not in PLACEHOLDERS:
        return value  # the common case: no punctuation, so none of the rules below can apply
    inner = unwrap_formula_text(value)
    if inner is not None:
        value = inner.strip(TRIMMED)
    bad = _invisible_chars(value)
    if bad:
        if not strip_invisible:
            names = ", ".join(sorted({f"U+{ord(c):04X}" for c in bad}))
            raise CellRejected(
                "invisible_chars",
                f"{label} {show(value)} contains invisible or control characters ({names}); "
                "delete and retype the value, or run with --strip-invisible to remove them",
            )
        drop = set(bad)
        value = "".join(c for c in value if c not in drop).strip(TRIMMED)
    if not value:
        return value
    if value.casefold() in PLACEHOLDERS:
        raise CellRejected(
            "placeholder",
            f"{label} {show(value)} is a placeholder, not a value; enter the real {label} or "
            "remove the row",
        )
    if _ERROR_LITERAL.fullmatch(value):
        if value.startswith("#") and value.strip("#") == "":
            raise CellRejected(
                "excel_error",
                f"{label} {show(value)} is what a spreadsheet shows when a column is too narrow "
                "for its number: the value itself was lost when the file was exported; widen the "
                "column (better: format it as Text) and export again",
            )
        raise CellRejected(
            "excel_error",
            f"{label} {show(value)} is a spreadsheet error, not a value: the formula that "
            "filled this cell failed before the file was saved; fix the formula (or paste the "
            "values as Text) and export again",
        )
    if _SCIENTIFIC.fullmatch(value):
        raise CellRejected(
            "scientific_notation",
            f"{label} {show(value)} is in scientific notation: the digits were lost by Excel; "
            "format the column as Text and re-enter the numbers (or take them from the source "
            "system)",
        )
    if _GROUPED.fullmatch(value):
        raise CellRejected(
            "thousands_separators",
            f"{label} {show(value)} is a number displayed with thousands separators, not the "
            f"{label} as typed; {_AS_TEXT_FIX}",
        )
    if _FLOAT_RENDERING.fullmatch(value):
        raise CellRejected(
            "float_rendering",
            f"{label} {show(value)} looks like a number converted to a decimal (a trailing '.0' "
            "was added by a program that read the column as numbers); export the column as Text "
            "so the value is exactly what was typed",
        )
    return value


# --------------------------------------------------------------------------------------------
# typed workbook cells


def display_text(v: object) -> str:
    """Any workbook value as text a user would recognise (headers and the non-key columns)."""
    if type(v) is str:
        return v  # type: ignore[return-value]
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) <= 2**53:  # exactly the stored integer
            return str(int(v))
        return repr(v)
    if isinstance(v, _dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, (_dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return str(v)
    return "" if v is None else str(v)


@dataclass(frozen=True, slots=True)
class NumberDisplay:
    """How a workbook displays a numeric cell: its number format code (.xlsx, .xls), or the text
    the file stores as displayed (.ods). Neither known: the format could not be read."""

    code: str | None = None
    shown: str | None = None


GENERAL = NumberDisplay(code="General")
UNREADABLE_FORMAT = NumberDisplay()

# A number section capbatch renders: digit placeholders with optional grouping commas, and zeros
# after the decimal point (0, 0000000000000000, #,##0, 0.00, #,##0.00).
_PLAIN_SECTION = re.compile(r"(?P<minus>-?)(?P<int>[#0,]*[#0])(?:\.(?P<dec>0+))?")
_DIGITS = re.compile(r"-?\d+")


def _sections(code: str) -> list[str]:
    """Split a format code on ';' outside quoted text and backslash escapes."""
    out, cur, quoted, escaped = [], [], False, False
    for ch in code:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def render_format(code: str, n: int) -> str | None:
    """The text a spreadsheet displays for the whole number ``n`` under format ``code``, for the
    formats capbatch renders exactly (General, @, digit placeholders, grouping, fixed zeros after
    the point); None for any other format (literal text, colours, conditions, %, E+...)."""
    sections = _compiled_format(code)
    if n < 0 and len(sections) > 1:
        section, sign = sections[1], ""  # the negative section writes its own sign, if any
    elif n == 0 and len(sections) > 2:
        section, sign = sections[2], ""
    else:
        section, sign = sections[0], "-" if n < 0 else ""
    if section is None:
        return None
    minus, zeros, grouped, dec, general = section
    if general:
        return sign + str(abs(n))
    digits = str(abs(n)).zfill(zeros)
    if n == 0 and not zeros:
        digits = ""  # '#' shows nothing for zero
    if grouped:
        head = len(digits) % 3 or 3
        digits = ",".join([digits[:head]] + [digits[i:i + 3] for i in range(head, len(digits), 3)])
    return sign + minus + digits + dec


@functools.lru_cache(maxsize=256)
def _compiled_format(code: str) -> tuple[tuple[str, int, bool, str, bool] | None, ...]:
    """Per section: (literal minus, zeros to pad to, grouping, '.00...' suffix, General), or None
    when capbatch cannot render the section."""
    out: list[tuple[str, int, bool, str, bool] | None] = []
    for section in _sections(code):
        if section.casefold() in ("general", "@"):
            out.append(("", 0, False, "", True))
            continue
        m = _PLAIN_SECTION.fullmatch(section)
        if m is None or m.group("int").endswith(","):  # a trailing comma scales by 1,000
            out.append(None)
            continue
        int_part, dec = m.group("int"), m.group("dec")
        out.append((m.group("minus"), int_part.count("0"), "," in int_part, "." + dec if dec else "",
                    False))
    return tuple(out)


def _format_kind(code: str) -> str:
    if '"' in code or "\\" in code:
        return "it adds literal text to the number"
    if re.search(r"[eE][+-]", code):
        return "scientific notation"
    if "%" in code:
        return "a percentage"
    if "," in code:
        return "thousands separators"
    if "." in code:
        return "fixed decimals"
    if "[" in code:
        return "a colour, condition or locale"
    if "?" in code or "#" in code:
        return "optional digits"
    return "a custom number format"


def _number_problem(label: str, text: str, why: str) -> CellProblem:
    return CellProblem("excel_number", f"the {label} cell holds the number {text}, {why}; {_AS_TEXT_FIX}")


def _render_number(v: float, label: str, display: NumberDisplay) -> tuple[str, CellProblem | None]:
    text = display_text(v)
    if isinstance(v, float) and not v.is_integer():
        return text, _number_problem(label, text, f"which is not a whole number, so it cannot be the {label}")
    if abs(v) >= 10**MAX_EXACT_DIGITS:
        return text, _number_problem(
            label, text, f"which has more than {MAX_EXACT_DIGITS} digits: spreadsheets keep only "
            f"{MAX_EXACT_DIGITS} significant digits, so the last digits may be wrong")
    n = int(v)
    plain = str(n)
    if n <= 0:
        # 0 is also what an .xls written by LibreOffice holds for a text formula's result (its cached
        # text is lost), so a zero would send the text "0" where the sheet shows e.g. "000104"
        why = ("a negative number" if n < 0 else
               "zero (also how an .xls stores a text formula's result, such as =\"000104\")")
        return plain, CellProblem(
            "excel_number",
            f"the {label} cell holds the number {plain}, {why}, which is not a {label}; {_AS_TEXT_FIX}")
    if display.shown is not None:  # OpenDocument: the file says what is displayed
        shown, how = display.shown, ""
    elif display.code is None:
        return plain, CellProblem(
            "excel_number_format",
            f"the {label} cell holds the number {plain} and its number format could not be read, "
            f"so the text the spreadsheet displays is unknown; {_AS_TEXT_FIX}")
    else:
        rendered = render_format(display.code, n)
        if rendered is None:
            return plain, CellProblem(
                "excel_number_format",
                f"the {label} cell holds the number {plain} displayed with the number format "
                f"{show(display.code)} ({_format_kind(display.code)}), which capbatch cannot "
                f"reproduce exactly; {_AS_TEXT_FIX}")
        shown, how = rendered, f" (number format {show(display.code)})"
    if shown == plain or (_DIGITS.fullmatch(shown) and int(shown) == n):
        return shown, None  # its digits, zero-padded or not: exactly what is displayed
    return plain, CellProblem(
        "excel_number_format",
        f"the {label} cell holds the number {plain} but displays it as {show(shown)}{how}, which "
        f"is not a {label}; {_AS_TEXT_FIX}")


def display_texts(values: Sequence[object]) -> Sequence[str]:
    """:func:`display_text` of each of a column's ``values``: C-level for a column of text only, one
    comprehension for a column of numbers only, else cell by cell."""
    kinds = set(map(type, values))
    if kinds <= {str}:
        return values  # type: ignore[return-value]
    if kinds == {float}:
        if -_EXACT <= min(values) and max(values) <= _EXACT and 0.0 not in values:  # type: ignore[type-var]
            # repr ends in '.0' exactly for the whole numbers (below 1e16), shown without it; with
            # zero (-0.0 shows as 0) and beyond 2**53 cell by cell
            return ("\n".join(map(repr, values)) + "\n").replace(".0\n", "\n").split("\n")[:-1]
        return [str(int(v)) if v.is_integer() and -_EXACT <= v <= _EXACT else repr(v)
                for v in values]  # type: ignore[attr-defined]
    return list(map(display_text, values))


_EXACT = 2**53


def render_whole_numbers(values: Sequence[object], display: NumberDisplay) -> list[str] | None:
    """The texts :func:`workbook_key` gives, without a problem, for a column of numbers shown with one
    ``display``: each positive whole number below 10**15 rendered by a plain-digits format (General,
    @, 0, zero padding). None when any value or the format needs :func:`workbook_key` cell by cell."""
    if display.code is None or not values or not set(map(type, values)) <= {int, float}:
        return None
    sections = _compiled_format(display.code)
    section = sections[0]
    if section is None:
        return None
    minus, zeros, grouped, dec, general = section
    if minus or grouped or dec:
        return None
    try:
        whole = list(map(int, values))
    except (OverflowError, ValueError):  # inf, nan
        return None
    if (not all(map(operator.eq, whole, values)) or min(whole) <= 0
            or max(whole) >= 10**MAX_EXACT_DIGITS):
        return None  # a fraction, zero or a negative number, too many digits: cell by cell
    texts = list(map(str, whole))
    if zeros and not general:
        texts = list(map(str.zfill, texts, repeat(zeros)))
    return texts


def workbook_key(
    v: object,
    label: str,
    display: NumberDisplay = GENERAL,
    special: tuple[str, str] | None = None,
) -> tuple[str, CellProblem | None]:
    """(text, problem) for a key cell of a workbook. ``display``: how a numeric cell is shown;
    ``special``: for an empty cell, what the file holds instead ('error', text) or
    ('formula', '')."""
    if type(v) is str:
        if v == "" and special is not None:
            kind, text = special
            if kind == "error":
                return text, CellProblem(
                    "excel_error",
                    f"the {label} cell shows the spreadsheet error {text}, not a value; fix the "
                    "formula or type the value (formatted as Text) and save the file",
                )
            return "", CellProblem(
                "formula_no_value",
                f"the {label} cell holds a formula without a computed value; open and save the "
                "file in Excel so the value is calculated (or paste the values as Text)",
            )
        return v, None  # type: ignore[return-value]
    if isinstance(v, bool):
        text = display_text(v)
        return text, CellProblem(
            "excel_bool",
            f"the {label} cell holds the logical value {text}, not a {label}; type the value "
            "into a column formatted as Text",
        )
    if isinstance(v, (int, float)):
        return _render_number(v, label, display)
    text = display_text(v)
    if isinstance(v, (_dt.date, _dt.time, _dt.timedelta)):
        return text, CellProblem(
            "excel_date",
            f"the {label} cell holds a date/time ({text}), not text: the spreadsheet converted what "
            "was typed; format the column as Text and re-enter the values",
        )
    return text, CellProblem(
        "excel_cell",
        f"the {label} cell holds an unsupported value ({show(text)}); type the value into a "
        "column formatted as Text",
    )


def problem_code(problem: str) -> str:
    """The stable code of a reader problem (also for plain strings read back from a ledger)."""
    code = getattr(problem, "code", None)
    if code:
        return code
    low = problem.lower()
    for needle, c in (
        ("spreadsheet error", "excel_error"),
        ("excel error", "excel_error"),
        ("formula", "formula_no_value"),
        ("number format", "excel_number_format"),
        ("date", "excel_date"),
        ("logical value", "excel_bool"),
        ("number", "excel_number"),
        ("cells but the header", "extra_cells"),
    ):
        if needle in low:
            return c
    return "excel_cell"
