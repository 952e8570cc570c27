"""capbatch: backfill loyalty-card external IDs into Capillary from spreadsheets.

Library use (an Airflow task, a notebook)::

    from capbatch import run_backfill
    summary = run_backfill("cards.xlsx", base_url="https://eu.api.capillarytech.com", rate="1000/min")
    summary["exit_code"]  # 0 all settled, 1 some rows failed/rejected

Credentials come from the environment (CAPILLARY_USERNAME/PASSWORD or CAPILLARY_CLIENT_KEY/SECRET).
Errors are the same :class:`CapbatchError` subclasses the CLI reports.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any  # noqa: E402

from .errors import (  # noqa: E402
    CapbatchError, ConfigError, InputFileError, Interrupted, LedgerError, RunAborted, UsageError,
)


def run_backfill(input: str, *, config_file: str | None = None, env: dict[str, str] | None = None,
                 **settings: Any) -> dict[str, Any]:
    """Run (or resume) a backfill of ``input`` and return the summary (as written to summary.json).

    ``settings`` take the CLI's long option names with underscores (``base_url``, ``cluster``, ``rate``,
    ``concurrency``, ``run_dir``, ``mode``, ...); precedence is the CLI's: these > environment > TOML
    file > defaults. A run with failed or rejected rows returns normally with ``exit_code`` 1; an
    aborted or interrupted run raises :class:`RunAborted` / :class:`Interrupted`.
    """
    import os
    from pathlib import Path

    from . import config, runner

    flags = {k: v for k, v in settings.items() if v is not None}
    flags["input"] = Path(input)
    for key in ("run_dir", "reports_dir"):
        if key in flags:
            flags[key] = Path(flags[key])
    resolved = config.resolve(flags, os.environ if env is None else env,
                              Path(config_file) if config_file else None)
    return runner.run(resolved)


def validate_file(input: str, **settings: Any) -> dict[str, Any]:
    """Validate ``input`` without any network; returns counts and the first problems."""
    import os
    from pathlib import Path

    from . import config, runner

    flags = {k: v for k, v in settings.items() if v is not None}
    flags["input"] = Path(input)
    return runner.validate(config.resolve(flags, os.environ))


__all__ = [
    "run_backfill", "validate_file", "CapbatchError", "ConfigError", "InputFileError", "Interrupted",
    "LedgerError", "RunAborted", "UsageError", "__version__",
]
