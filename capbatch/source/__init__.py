"""Input reading: spreadsheets and delimited text -> rows of cell text, exactly as the user sees them.

One module per job:

=============  ==============================================================================
``sniff``      what the file is, by content (csv, xlsx, xls, ods) -- or a clear refusal
``encoding``   how a text file is decoded (strictly, before any row is read)
``delimited``  CSV/TSV: delimiter, header, structure check, rows
``workbook``   .xlsx/.xls/.ods through python-calamine: the sheet rule, header, rows; with one
               engine module per format (``_xlsx``, ``_xls``, ``_ods``) for what calamine does
               not expose (number formats, error cells)
``headers``    which columns are the card number and the external ID; repeated header rows
``cells``      the cell rules shared by every format: whether a key cell's text may be sent
``census``     the open-time pass: data rows counted, repeated headers found, notes
``table``      ``open_input`` and ``InputTable``: what every format shares
``frame``      in-memory input (a pandas.DataFrame, pairs, mappings) as the same rows; the cell
               rules apply to it through ``rules`` like to any file
=============  ==============================================================================
"""

from .cells import PLACEHOLDERS
from .headers import normalize_header, resolve_columns
from .model import (
    CARD_FIELD,
    EXTERNAL_ID_FIELD,
    REPORT_COLUMN_PREFIX,
    REPORT_MARKER_COLUMN,
    SHEET_ALL,
    CellProblem,
    InputOptions,
    RowBatch,
    SourceRow,
)
from .sniff import file_sha256
from .table import InputTable, open_input

__all__ = [
    "CARD_FIELD",
    "EXTERNAL_ID_FIELD",
    "PLACEHOLDERS",
    "REPORT_COLUMN_PREFIX",
    "REPORT_MARKER_COLUMN",
    "SHEET_ALL",
    "CellProblem",
    "InputOptions",
    "InputTable",
    "RowBatch",
    "SourceRow",
    "file_sha256",
    "normalize_header",
    "open_input",
    "resolve_columns",
]
