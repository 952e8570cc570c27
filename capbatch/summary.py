"""The run's summary as code receives it: the content of summary.json, with the main figures as attributes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


class Summary(dict):  # type: ignore[type-arg]
    """What ``run_backfill`` returns: the summary.json content (a ``dict``, so ``summary["exit_code"]``
    and ``json.dumps(summary)`` work), plus:

    - ``exit_code``: 0 every row settled; 1 some rows failed or were rejected (the CLI's exit codes)
    - ``ok``: ``exit_code == 0``
    - ``counts``: rows per state (pending, in_flight, succeeded, failed, rejected, unchanged, duplicate)
    - ``run_dir``: the run directory (a Path): rerun with it to resume; ``load_results(run_dir)``;
      None when nothing ran (``stop`` "outside window": ``window_exit`` outside the windows)
    - ``to_dict()``: a plain, independent ``dict`` copy

    Other keys: ``input`` (name, sha256, rows, columns, mapping), ``failed_by_error_code``,
    ``rejected_by_reason``, ``requests``, ``retries``, ``throttled_responses``, ``duration_seconds``,
    ``throughput_rows_per_second``, ``latency_ms``, ``started_at``/``ended_at`` (ISO 8601, UTC),
    ``settings``, ``stop`` and ``message``, ``this_invocation``.
    """

    __slots__ = ()

    @property
    def exit_code(self) -> int:
        return int(self["exit_code"])

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def counts(self) -> dict[str, int]:
        return dict(self["counts"])

    @property
    def run_dir(self) -> Path | None:
        """None when no run took place (``stop`` "outside window": --window-exit outside the windows)."""
        return Path(self["run_dir"]) if self.get("run_dir") else None

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self))

    def __repr__(self) -> str:
        return f"Summary(exit_code={self.get('exit_code')}, counts={self.get('counts')}, run_dir={self.get('run_dir')!r})"
