"""Telling the outside world how a ``run`` invocation goes: the metrics file (at the start, every
``--progress-interval`` and at the end), the Pushgateway and the webhook (at the end).

Every end is announced once — done, aborted, interrupted, refused input, even a crash — because a
scheduler's alert must fire on the nights that go wrong. Only an unwritable ``--metrics-file`` at the
start is an error (exit 2, nothing sent); anything that fails later is a warning and never changes
the run's exit code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import CapbatchError, UsageError
from .exitcodes import EXIT_INTERNAL, EXIT_INTERRUPTED

if TYPE_CHECKING:
    from . import metrics
    from .engine import Counters
    from .ledger import Ledger

log = logging.getLogger("capbatch.announce")



@dataclass(frozen=True)
class Targets:
    """Where to announce. All optional; an empty Targets announces nothing."""

    metrics_file: Path | None = None
    pushgateway: str | None = None
    notify_url: str | None = None
    job: str | None = None

    def __bool__(self) -> bool:
        return bool(self.metrics_file or self.pushgateway or self.notify_url)


def exit_code_of(exc: BaseException) -> int:
    if isinstance(exc, CapbatchError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_INTERNAL


def _metrics() -> Any:
    """capbatch.metrics (prometheus_client, ~0.1 s of imports) only when a run announces anything."""
    from . import metrics

    return metrics


class Announcer:
    def __init__(self, targets: Targets, input_name: str = "") -> None:
        self.t = targets
        self.input_name = input_name
        self.live: metrics.LiveFigures | None = None
        self.counters: Counters | None = None
        self.done = False
        self.last_success = _metrics().previous_last_success(targets.metrics_file, targets.job) \
            if targets.metrics_file else None

    # ---- while running -------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Write the metrics file once before anything is sent: an unwritable path is exit 2."""
        if not self.t.metrics_file:
            return
        path = self.t.metrics_file
        if path.suffix != ".prom":
            log.warning("--metrics-file %s: node_exporter's textfile collector reads only *.prom files", path)
        try:
            metrics = _metrics()
            metrics.write_textfile(path, metrics.Figures(job=metrics.job_label(self.t.job), input=self.input_name,
                                                         last_success=self.last_success))
        except OSError as exc:
            raise UsageError(f"--metrics-file {path} cannot be written ({exc.strerror or exc})",
                             "point --metrics-file at a writable file, e.g. in node_exporter's textfile "
                             "directory") from exc

    def attach(self, ledger: Ledger) -> None:
        """The run's ledger is open: from now on the figures are the run's totals."""
        self.input_name = ledger.get_meta("input_name") or self.input_name
        if not self.t:
            return             # nothing to announce: no figures to keep
        metrics = _metrics()
        self.last_success = max(filter(None, [self.last_success,
                                              metrics.previous_last_success(None, self.t.job, ledger)]),
                                default=None)
        self.live = metrics.LiveFigures(ledger, self.t.job, self.last_success)

    def tick(self, counters: Counters) -> None:
        """Every --progress-interval while the engine runs (on the event loop: small and quick)."""
        self.counters = counters
        if self.t.metrics_file and self.live is not None:
            self._write(self.live.figures(counters))

    # ---- the end -------------------------------------------------------------------------------
    def finished(self, summary: Mapping[str, Any], exit_code: int) -> None:
        """The invocation ended with a summary (done, aborted or interrupted)."""
        if self.done:
            return
        self.done = True
        if not self.t:
            return
        figures = _metrics().figures_from_summary(summary, self.t.job, exit_code, self.last_success)
        report = Path(str(summary.get("run_dir") or "")) / "report.html" if summary.get("run_dir") else None
        self._end(figures, exit_code, summary, None, str(report) if report else None)

    def nothing_sent(self, message: str) -> None:
        """The invocation ended at once by design (outside its windows with --window-exit): exit 0,
        no run; the time of the last success stays that of the last run that settled its rows."""
        if self.done:
            return
        self.done = True
        if not self.t:
            return
        figures = _metrics().without_run(self.t.job, self.input_name, 0, self.last_success)
        self._end(figures, 0, None, message, None)

    def failed(self, exc: BaseException) -> None:
        """The invocation ended without a summary: refused input or settings, a lost ledger, a crash."""
        if self.done:
            return
        self.done = True
        if not self.t:
            return
        metrics = _metrics()
        code = exit_code_of(exc)
        if self.live is not None:
            figures = metrics.ended(self.live.figures(self.counters), code)
        else:
            figures = metrics.without_run(self.t.job, self.input_name, code, self.last_success)
        reason = str(exc) if isinstance(exc, CapbatchError) else f"internal error ({exc.__class__.__name__})"
        self._end(figures, code, None, reason or exc.__class__.__name__, None)

    def _end(self, figures: metrics.Figures, exit_code: int, summary: Mapping[str, Any] | None,
             error: str | None, report_path: str | None) -> None:
        if self.t.metrics_file:
            self._write(figures)
        if self.t.pushgateway:
            try:
                _metrics().push(self.t.pushgateway, figures)
                log.debug("metrics pushed to the Pushgateway (job %s)", figures.job)
            except Exception as exc:  # noqa: BLE001 - a monitoring hiccup must not fail the run
                log.warning("pushing metrics to the Pushgateway failed (%s); the run's result is unaffected",
                            _reason(exc))
        if self.t.notify_url:
            from . import notify   # urllib.request: only to notify

            text = notify.message(job=self.t.job, input_name=self.input_name or None, exit_code=exit_code,
                                  summary=summary, error=error, report_path=report_path)
            notify.send(self.t.notify_url, text)

    def _write(self, figures: metrics.Figures) -> None:
        assert self.t.metrics_file is not None
        try:
            _metrics().write_textfile(self.t.metrics_file, figures)
        except OSError as exc:
            log.warning("--metrics-file %s could not be written (%s)", self.t.metrics_file, exc.strerror or exc)


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc) or exc.__class__.__name__
