"""capbatch: backfill loyalty-card external IDs into Capillary from spreadsheets and DataFrames.

From code (an Airflow task, a Dagster asset, a notebook)::

    import capbatch
    summary = capbatch.run_backfill(df, cluster="eu", rate="1000/min")   # or a path, or pairs
    summary.exit_code                  # 0 all settled, 1 some rows failed/rejected
    failures = capbatch.load_failures(summary.run_dir)

Credentials come from the environment (CAPILLARY_USERNAME/PASSWORD or CAPILLARY_CLIENT_KEY/SECRET).
Errors are the same :class:`CapbatchError` subclasses the CLI reports. See README "Use from code".
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CapbatchError,
    ConfigError,
    InputFileError,
    Interrupted,
    LedgerError,
    LedgerLost,
    Paused,
    PlanError,
    RunAborted,
    UsageError,
)

if TYPE_CHECKING:
    from .library import run_backfill, run_backfill_async, validate_file, validate_frame
    from .results import load_failures, load_results
    from .summary import Summary

# Loaded on first use, so `import capbatch` (and every CLI start) stays cheap: pandas, asyncio and the
# HTTP stack come in only when a function that needs them is called.
_LAZY = {
    "run_backfill": "library", "run_backfill_async": "library", "validate_file": "library",
    "validate_frame": "library", "load_results": "results", "load_failures": "results", "Summary": "summary",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'capbatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CapbatchError",
    "ConfigError",
    "InputFileError",
    "Interrupted",
    "LedgerError",
    "LedgerLost",
    "Paused",
    "PlanError",
    "RunAborted",
    "Summary",
    "UsageError",
    "__version__",
    "load_failures",
    "load_results",
    "run_backfill",
    "run_backfill_async",
    "validate_file",
    "validate_frame",
]
