"""Office Open XML (.xlsx/.xlsm): what python-calamine does not expose, read from the file itself.

calamine (0.9) returns a cell's value but neither its number format nor whether an empty value is
an error cell or a formula without a cached result. Both come from the XML: ``xl/styles.xml``
(``numFmts`` + ``cellXfs``) maps a cell's ``s`` attribute to its number format code, and one
streaming pass over the sheet XML collects, for the two key columns only, each numeric cell's
style (run-length encoded: a column usually has one style) and the error/formula cells. Memory
stays flat whatever the sheet's size.

The pass matches the start tags of the key columns' cells (``<c r="B12" s="3" t="n">``) with one
regular expression over the decompressed bytes, so the C regex engine skips every other cell: in
XML a literal ``<`` is always markup, so a start tag cannot be mistaken for cell text. Sheets
whose cells carry no ``r`` reference (rare writers) are read with an expat pass instead.
"""

from __future__ import annotations

import bisect
import re
import zipfile
from operator import itemgetter
from pathlib import Path
from typing import IO
from xml.etree import ElementTree
from xml.parsers import expat

from .cells import UNREADABLE_FORMAT, NumberDisplay, render_format

# ECMA-376 part 1, 18.8.30: the built-in number formats a file may use without declaring them.
BUILTIN_FORMATS = {
    0: "General", 1: "0", 2: "0.00", 3: "#,##0", 4: "#,##0.00", 9: "0%", 10: "0.00%",
    11: "0.00E+00", 12: "# ?/?", 13: "# ??/??", 14: "mm-dd-yy", 15: "d-mmm-yy", 16: "d-mmm",
    17: "mmm-yy", 18: "h:mm AM/PM", 19: "h:mm:ss AM/PM", 20: "h:mm", 21: "h:mm:ss",
    22: "m/d/yy h:mm", 37: "#,##0 ;(#,##0)", 38: "#,##0 ;[Red](#,##0)", 39: "#,##0.00;(#,##0.00)",
    40: "#,##0.00;[Red](#,##0.00)", 45: "mm:ss", 46: "[h]:mm:ss", 47: "mmss.0", 48: "##0.0E+0",
    49: "@",
}
_CELL_REF = re.compile(r"([A-Z]+)(\d+)")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def _col_index(letters: str) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - 64)
    return n - 1


def plain_digits(code: str) -> bool:
    """True when the format shows every whole number as its plain digits (General, 0, @)."""
    return all(render_format(code, n) == str(n) for n in (1234567, -1234567, 0))


def _rels(zf: zipfile.ZipFile) -> dict[str, tuple[str, str]]:
    """workbook relationship id -> (type, member path)."""
    out = {}
    for rel in ElementTree.fromstring(zf.read("xl/_rels/workbook.xml.rels")):
        target = rel.get("Target", "")
        member = target.lstrip("/") if target.startswith("/") else "xl/" + target
        out[rel.get("Id", "")] = (rel.get("Type", ""), member)
    return out


def _sheet_member(zf: zipfile.ZipFile, sheet_name: str) -> str:
    for el in ElementTree.fromstring(zf.read("xl/workbook.xml")).iter():
        if _local(el.tag) == "sheet" and el.get("name") == sheet_name:
            rid = next((v for k, v in el.attrib.items() if _local(k) == "id"), None)
            if rid is not None:
                return _rels(zf)[rid][1]
    raise KeyError(sheet_name)


class Styles:
    """The number format code of every cell style (cellXfs index) of a workbook."""

    def __init__(self, path: Path) -> None:
        self.codes: list[str] = []
        self.plain = True
        self._displays: dict[int, NumberDisplay] = {}
        with zipfile.ZipFile(path) as zf:
            member = next((m for t, m in _rels(zf).values() if t.endswith("/styles")), "xl/styles.xml")
            try:
                root = ElementTree.fromstring(zf.read(member))
            except KeyError:
                return  # no styles part: every cell is General
        custom: dict[int, str] = {}
        xfs = None
        for el in root:
            name = _local(el.tag)
            if name == "numFmts":
                for fmt in el:
                    custom[int(fmt.get("numFmtId", "0"))] = fmt.get("formatCode", "")
            elif name == "cellXfs":
                xfs = el
        for xf in xfs if xfs is not None else ():
            fid = int(xf.get("numFmtId", "0"))
            self.codes.append(custom.get(fid) or BUILTIN_FORMATS.get(fid) or f"built-in format {fid}")
        self.plain = all(plain_digits(c) for c in set(self.codes))

    def display(self, xf: int) -> NumberDisplay:
        shown = self._displays.get(xf)
        if shown is None:
            if not self.codes:
                shown = NumberDisplay(code="General")
            else:
                shown = NumberDisplay(code=self.codes[xf]) if 0 <= xf < len(self.codes) else UNREADABLE_FORMAT
            self._displays[xf] = shown
        return shown


class _SheetScan:
    """One expat pass over a sheet's XML, keeping what the key columns need."""

    def __init__(self, cols: set[int]) -> None:
        self.cols = cols
        self.runs: dict[int, tuple[list[int], list[int]]] = {c: ([], []) for c in cols}
        self.special: dict[tuple[int, int], tuple[str, str]] = {}
        self._row0 = -1
        self._col = -1
        self._cell: list | None = None  # [row0, col, t, has_formula, has_value, text parts]
        self._parser = expat.ParserCreate()
        self._parser.buffer_text = True
        self._parser.StartElementHandler = self._start

    def run(self, fh: IO[bytes]) -> None:
        self._parser.ParseFile(fh)
        self._finish()

    def _chars(self, text: str) -> None:
        if self._cell is not None:
            self._cell[5].append(text)

    def _finish(self) -> None:
        cell = self._cell
        if cell is None:
            return
        self._cell = None
        self._parser.CharacterDataHandler = None
        row0, col, t, has_f, _has_v, parts = cell
        text = "".join(parts).strip()
        if t == "e":
            self.special[(row0, col)] = ("error", text or "#ERROR")
        elif has_f and not text and t != "str":
            self.special[(row0, col)] = ("formula", "")

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        local = name[name.find(":") + 1:]
        if local == "c":
            self._finish()
            ref = attrs.get("r")
            m = _CELL_REF.fullmatch(ref) if ref else None
            if m:
                self._col = _col_index(m.group(1))
                self._row0 = int(m.group(2)) - 1
            else:
                self._col += 1
            col = self._col
            if col in self.cols:
                t = attrs.get("t")
                if t is None or t == "n":
                    xf = int(attrs.get("s", "0"))
                    starts, xfs = self.runs[col]
                    if not xfs or xfs[-1] != xf:
                        starts.append(self._row0)
                        xfs.append(xf)
                self._cell = [self._row0, col, t, False, False, []]
        elif local == "row":
            self._finish()
            r = attrs.get("r")
            self._row0 = int(r) - 1 if r else self._row0 + 1
            self._col = -1
        elif self._cell is not None:
            if local == "f":
                self._cell[3] = True
            elif local == "v":
                self._cell[4] = True
                if self._cell[2] == "e" or self._cell[3]:
                    self._parser.CharacterDataHandler = self._chars


def _letters(col: int) -> str:
    out = ""
    col += 1
    while col:
        col, rem = divmod(col - 1, 26)
        out = chr(65 + rem) + out
    return out


_CHUNK = 4 << 20
_ANY_CELL = re.compile(rb"<(?:[\w.-]+:)?c[\s>/]")
_REF_ATTR = re.compile(rb"<(?:[\w.-]+:)?c\s[^>]*?\br=\"")
_FIRST_CHILD_F = re.compile(rb"<(?:[\w.-]+:)?f[\s>/]")
_CELL_END = re.compile(rb"</(?:[\w.-]+:)?c>")
_V_TEXT = re.compile(rb"<(?:[\w.-]+:)?v>([^<]*)<")
_ROW_END = re.compile(rb"</(?:[\w.-]+:)?row>")


def _last_row_end(buf: bytes) -> int | None:
    """Where the chunk's last complete row ends (after its end tag), or None."""
    at = buf.rfind(b"</row>")
    if at >= 0 and buf.find(b":row>", at) < 0:  # the usual unprefixed tag, and no prefixed one after it
        return at + len(b"</row>")
    cut = None
    for cut in _ROW_END.finditer(buf, max(0, len(buf) - (1 << 20))):
        pass
    return cut.end() if cut is not None else None


class _NoReferences(Exception):
    """Some cell tags carry no r reference: the sheet needs the expat pass."""


class _TagScan:
    """The key columns' cell start tags, found by one regular expression per chunk."""

    def __init__(self, cols: set[int]) -> None:
        self.runs: dict[int, tuple[list[int], list[int]]] = {c: ([], []) for c in cols}
        self.special: dict[tuple[int, int], tuple[str, str]] = {}
        self._col_of = {_letters(c).encode(): c for c in cols}
        alt = b"|".join(re.escape(k) for k in self._col_of)
        # A key column's cell, unless it is typed as text, boolean or date (those need no facts),
        # with its s and t attributes captured wherever they stand in the tag. The fast form
        # (an unprefixed tag whose first attribute is r, as Excel, LibreOffice and the Python
        # writers put it) lets the regex engine jump from one literal '<c r="' to the next.
        rest = (rb"(?![^>]*?\bt=\"(?:s|inlineStr|str|b|d)\")"
                rb"(?=(?:[^>]*?\bs=\"(\d+)\")?)(?=(?:[^>]*?\bt=\"(\w+)\")?)[^>]*?(/?)>")
        self._fast = re.compile(rb"<c r=\"(" + alt + rb")(\d+)\"" + rest)
        self._general = re.compile(rb"<(?:[\w.-]+:)?c\s(?=[^>]*?\br=\"(" + alt + rb")(\d+)\")" + rest)
        # The key columns' cells with their s and t attributes in the usual order (r, s, t); the last
        # group is anything else the tag holds (then the chunk takes the general path).
        self._strict = re.compile(rb"<c r=\"(" + alt + rb")(\d+)\"(?: s=\"(\d+)\")?(?: t=\"(\w+)\")?([^>]*)>")

    def run(self, fh: IO[bytes]) -> bool:
        """Scan the sheet; False when its cells carry no r reference (use the expat pass)."""
        carry = b""
        try:
            while True:
                chunk = fh.read(_CHUNK)
                buf = carry + chunk
                if not chunk:
                    self._feed(buf)
                    return True
                end = _last_row_end(buf)
                if end is None:
                    carry = buf  # no complete row yet: read on
                    continue
                self._feed(buf[:end])
                carry = buf[end:]
        except _NoReferences:
            return False

    def _feed(self, buf: bytes) -> None:
        prefixed = b":" in buf  # a single byte: memchr; the 2-3 byte searches only when it is there
        if (buf.count(b"<c ") == buf.count(b'<c r="') and b"<c>" not in buf
                and not (prefixed and (b":c " in buf or b":c>" in buf))):
            tag = self._fast  # every cell tag of this chunk has the fast form
        elif len(_ANY_CELL.findall(buf)) == len(_REF_ATTR.findall(buf)):
            tag = self._general
        else:
            raise _NoReferences
        # '<' is always markup, so '<f' is a formula (or another f... element: then the general path)
        if tag is self._fast and b't="e"' not in buf and b"<f" not in buf and not (prefixed and b":f" in buf) \
                and self._styles_only(buf):
            return
        runs, special, col_of = self.runs, self.special, self._col_of
        for m in tag.finditer(buf):
            letters, digits, xf, t, empty = m.groups()
            col = col_of[letters]
            row0 = int(digits) - 1
            if t is None or t == b"n":
                xf = int(xf or 0)
                starts, xfs = runs[col]
                if not xfs or xfs[-1] != xf:
                    starts.append(row0)
                    xfs.append(xf)
            if empty:
                continue  # <c .../>: no content
            end = m.end()
            if t == b"e" or _FIRST_CHILD_F.match(buf, end):
                close = _CELL_END.search(buf, end)
                v = _V_TEXT.search(buf, end, close.start() if close else len(buf))
                text = v.group(1).decode("utf-8", "replace").strip() if v else ""
                if t == b"e":
                    special[(row0, col)] = ("error", text or "#ERROR")
                elif not text:
                    special[(row0, col)] = ("formula", "")


    def _styles_only(self, buf: bytes) -> bool:
        """_feed for a chunk that holds no error cell and no formula, when every key column cell's tag
        has the usual attribute order: only the style runs are needed, from one findall (C-level),
        walked cell by cell only where a style changes. False: not such a chunk."""
        found = self._strict.findall(buf)  # (column letters, row digits, s, t, the rest of the tag)
        if not found:
            return True
        if not set(map(itemgetter(4), found)) <= {b"", b"/"}:
            return False
        numeric_types = {b"", b"n"}
        kinds = set(zip(map(itemgetter(0), found), map(itemgetter(2), found), map(itemgetter(3), found)))
        current = {letters: xfs[-1] if xfs else None
                   for letters, (_starts, xfs) in ((k, self.runs[c]) for k, c in self._col_of.items())}
        if all(current[letters] == int(xf or 0) for letters, xf, t in kinds if t in numeric_types):
            return True  # every column's current style run goes on through this chunk
        for letters, digits, xf, t, _rest in found:
            if t in numeric_types:
                starts, xfs = self.runs[self._col_of[letters]]
                style = int(xf or 0)
                if not xfs or xfs[-1] != style:
                    starts.append(int(digits) - 1)
                    xfs.append(style)
        return True


class XlsxFacts:
    """Number formats and error/formula cells of one sheet's key columns."""

    def __init__(self, path: Path, sheet_name: str, cols: set[int], styles: Styles) -> None:
        self._styles = styles
        with zipfile.ZipFile(path) as zf:
            member = _sheet_member(zf, sheet_name)
            scan: _TagScan | _SheetScan = _TagScan(cols)
            with zf.open(member) as fh:
                done = scan.run(fh)  # type: ignore[union-attr]
            if not done:
                scan = _SheetScan(cols)
                with zf.open(member) as fh:
                    scan.run(fh)
        self._runs = scan.runs
        self.special = scan.special.get

    def display(self, row0: int, col: int) -> NumberDisplay:
        starts, xfs = self._runs.get(col, ((), ()))
        at = bisect.bisect_right(starts, row0) - 1
        if at < 0:
            return UNREADABLE_FORMAT
        return self._styles.display(xfs[at])

    def display_range(self, first0: int, last0: int, col: int) -> NumberDisplay | None:
        """The one display of column ``col``'s numeric cells in rows ``first0..last0`` (0-based), or
        None when their style changes within those rows."""
        starts, xfs = self._runs.get(col, ((), ()))
        at = bisect.bisect_right(starts, first0) - 1
        if at < 0 or bisect.bisect_right(starts, last0) - 1 != at:
            return None
        return self._styles.display(xfs[at])


class XlsxEngine:
    """Per workbook: whether numbers need the sheet pass at all, and the per-sheet facts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._styles: Styles | None = Styles(path)
        except Exception:  # noqa: BLE001 - unreadable styles: every number's format is unknown
            self._styles = None

    @property
    def numbers_plain(self) -> bool:
        return self._styles is not None and self._styles.plain

    def facts(self, sheet_name: str, cols: set[int]) -> XlsxFacts | None:
        if self._styles is None:
            return None
        return XlsxFacts(self.path, sheet_name, cols, self._styles)
