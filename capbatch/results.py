"""A run's outcome as pandas DataFrames, read from its ledger (not from the CSV reports).

Columns are those of results.csv: ``capbatch_row`` and ``capbatch_sheet``, the input's own columns,
then ``capbatch_*`` outcome columns. Every ID and text column is ``pd.StringDtype()`` (card numbers and
external IDs stay exactly as sent, leading zeros included), the state is a categorical with every
state as a category, counts are nullable integers and ``capbatch_settled_at`` is ``datetime64[us, UTC]`` (UTC-aware,
microseconds; NaT for a row not settled) in every frame, empty or not, so frames of several runs concat.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError
from .ledger import Ledger, State
from .report import _reason, warnings_text

OUTCOME_COLUMNS = (
    "capbatch_state", "capbatch_attempts", "capbatch_http_status", "capbatch_error_code", "capbatch_message",
    "capbatch_card", "capbatch_sent_external_id", "capbatch_previous_external_id", "capbatch_generated",
    "capbatch_card_id", "capbatch_customer_id", "capbatch_latency_ms", "capbatch_settled_at",
    "capbatch_warnings",
)
FAILED_STATES = ("failed", "rejected")
SETTLED_AT_UNIT = "us"   # capbatch_settled_at: microseconds, UTC-aware, in every frame
PROBLEM_STATES = ("rejected", "duplicate")


def _run_dir(run_dir: Any) -> Path:
    if isinstance(run_dir, Mapping) and "run_dir" in run_dir:   # a Summary from run_backfill
        run_dir = run_dir["run_dir"]
    if not isinstance(run_dir, (str, os.PathLike)):
        raise UsageError(f"run_dir is a {type(run_dir).__name__}, not a path",
                         "pass the run directory (summary.run_dir) or the summary run_backfill returned")
    return Path(run_dir)


def load_results(run_dir: Any) -> Any:
    """Every row of a run, in input order, as a DataFrame (see the module docstring for the columns).

    ``run_dir`` is the run directory or the Summary ``run_backfill`` returned. Safe while a run writes.
    For a DataFrame input, ``capbatch_row`` is the input's index label: ``df.join(results.set_index(
    "capbatch_row"))`` puts each outcome beside its row. ``capbatch_settled_at`` is
    ``datetime64[us, UTC]``, as in :func:`load_failures`.
    """
    return _outcome_frame(_run_dir(run_dir), ())


def load_failures(run_dir: Any) -> Any:
    """The failed and rejected rows of a run (the content of failures.csv), same columns and dtypes as
    load_results (``capbatch_settled_at``: ``datetime64[us, UTC]``, even when no row failed)."""
    return _outcome_frame(_run_dir(run_dir), FAILED_STATES)


def _outcome_frame(run_dir: Path, states: Iterable[str]) -> Any:
    import pandas as pd

    with Ledger.open_readonly(run_dir) as ledger:
        columns = ledger.get_meta_json("columns", [])
        width = len(columns)
        rows, sheets, originals = [], [], []
        outcome: dict[str, list[Any]] = {name: [] for name in OUTCOME_COLUMNS}
        has_warnings = ledger.has_column("warnings")
        for r in ledger.rows_in_states(tuple(states)):
            rows.append(r["row_number"])
            sheets.append(r["sheet"])
            values = json.loads(r["original"])
            originals.append(values[:width] + [""] * (width - len(values)))
            code, message = _reason(r["error_code"], r["error_message"], r["reason_code"], r["reason"], r["note"])
            for name, value in (
                    ("capbatch_state", r["state"]), ("capbatch_attempts", r["attempts"]),
                    ("capbatch_http_status", r["http_status"]), ("capbatch_error_code", code or None),
                    ("capbatch_message", message or None), ("capbatch_card", r["card"]),
                    ("capbatch_sent_external_id", r["external_id"] if r["state"] != "rejected" else None),
                    ("capbatch_previous_external_id", r["previous_external_id"]),
                    ("capbatch_generated", bool(r["generated"])), ("capbatch_card_id", r["card_id"]),
                    ("capbatch_customer_id", r["customer_id"]), ("capbatch_latency_ms", r["latency_ms"]),
                    ("capbatch_settled_at", r["settled_at"]),
                    ("capbatch_warnings", warnings_text(r["warnings"]) if has_warnings and r["warnings"] else None)):
                outcome[name].append(value)

    text = pd.StringDtype()
    data: list[Any] = [pd.array(rows, dtype="Int64"), pd.array(sheets, dtype=text)]
    data += [pd.array([row[i] for row in originals], dtype=text) for i in range(width)]
    typed = {
        "capbatch_state": pd.Categorical(outcome["capbatch_state"], categories=[s.value for s in State]),
        "capbatch_attempts": pd.array(outcome["capbatch_attempts"], dtype="Int64"),
        "capbatch_http_status": pd.array(outcome["capbatch_http_status"], dtype="Int64"),
        "capbatch_generated": pd.array(outcome["capbatch_generated"], dtype="boolean"),
        "capbatch_latency_ms": pd.array(outcome["capbatch_latency_ms"], dtype="Float64"),
        "capbatch_settled_at": settled_at_column(outcome["capbatch_settled_at"]),
    }
    data += [typed[name] if name in typed else pd.array(outcome[name], dtype=text) for name in OUTCOME_COLUMNS]
    names = ["capbatch_row", "capbatch_sheet", *columns, *OUTCOME_COLUMNS]
    frame = pd.DataFrame(dict(enumerate(data)))   # by position: input columns may repeat a name
    frame.columns = names
    return frame


def settled_at_column(seconds: list[float | None]) -> Any:
    """Epoch seconds as ``datetime64[us, UTC]`` whatever the values (none, whole seconds, or fractions
    that would otherwise make pandas pick nanoseconds): every frame gets the one dtype."""
    import pandas as pd

    stamps = pd.to_datetime(pd.Series(seconds, dtype="float64"), unit="s", utc=True)
    return stamps.dt.round("us").dt.as_unit(SETTLED_AT_UNIT).array


def problems_frame(ledger: Ledger, labels: Any = None, index_name: str | None = "row") -> Any:
    """The rejected and duplicate rows of a validated input, one per row: ``column`` (the input column
    the problem is about), ``value`` (its cell), ``reason_code``, ``reason``. Indexed by the row label,
    or by ``labels[row_number]`` when given (a DataFrame's own index labels, by position)."""
    import pandas as pd

    columns = ledger.get_meta_json("columns", [])
    mapping = ledger.get_meta_json("mapping", {})
    header_of = {"card": mapping.get("cardNumber"), "external_id": mapping.get("cardExternalId")}
    index, column, value, code, reason = [], [], [], [], []
    for r in ledger.rows_in_states(PROBLEM_STATES):
        index.append(r["row_number"] if labels is None else labels[r["row_number"]])
        name = header_of.get(r["problem_column"] or "")
        values = json.loads(r["original"])
        at = columns.index(name) if name in columns else None
        column.append(name)
        value.append(values[at] if at is not None and at < len(values) else None)
        code.append(r["reason_code"])
        reason.append(r["reason"])
    text = pd.StringDtype()
    return pd.DataFrame({"column": pd.array(column, dtype=text), "value": pd.array(value, dtype=text),
                         "reason_code": pd.array(code, dtype=text), "reason": pd.array(reason, dtype=text)},
                        index=pd.Index(index, name=index_name, tupleize_cols=labels is not None))
