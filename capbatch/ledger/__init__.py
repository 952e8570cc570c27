"""The run's ledger: every input row and its state, in SQLite (default) or PostgreSQL."""

from .sqlite import (LEDGER_FILE, LOCK_FILE, SCHEMA_VERSION, SETTLED_OK, Ledger, RowResult, State,  # noqa: F401
                     WorkRow, row_label)
