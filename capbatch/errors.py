"""One exception tree. Every message says what went wrong and what to do about it."""

from __future__ import annotations

from typing import Any

from .exitcodes import EXIT_ABORTED, EXIT_INTERRUPTED, EXIT_USAGE


class CapbatchError(Exception):
    """Base of every error capbatch reports to a user. ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        #: what a machine-readable answer (``validate --json``) adds to the message, e.g. a census of sheets
        self.details: dict[str, Any] = {}

    def __str__(self) -> str:
        return f"{self.message}\n  -> {self.hint}" if self.hint else self.message


class UsageError(CapbatchError):
    """A flag, setting or combination of them is wrong. Nothing was sent."""


class ConfigError(CapbatchError):
    """The configuration (file, environment, credentials) is wrong. Nothing was sent."""


class InputFileError(CapbatchError):
    """The input file as a whole cannot be used (unreadable, wrong format, missing columns)."""


class LedgerError(CapbatchError):
    """The run directory or its ledger cannot be used (locked, mismatched, read-only, full)."""


class RunAborted(CapbatchError):
    """The run stopped because continuing would only burn rows (credentials, outage). Resumable."""

    exit_code = EXIT_ABORTED


class PlanError(CapbatchError):
    """The plan cannot do what was asked of it (--deadline-strict). Nothing was sent."""


class Paused(CapbatchError):
    """The sending window closed and --window-exit asked the run to stop there. Resumable."""

    exit_code = EXIT_ABORTED


class Interrupted(CapbatchError):
    """The run was interrupted by a signal. Resumable."""

    exit_code = EXIT_INTERRUPTED


class LedgerLost(LedgerError):
    """The ledger (a database) went away mid-run: sending stopped; rerunning resumes."""

    exit_code = EXIT_ABORTED
