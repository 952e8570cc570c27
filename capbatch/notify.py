"""``--notify-url``: one short message to a chat webhook when an invocation ends.

The body is ``{"text": ...}``, which Slack and Microsoft Teams incoming webhooks (and most chat tools)
accept. It carries the one-line summary, the counts, the exit code and the report's path — never a
credential, a URL with a token, or row data. A webhook that fails or hangs costs a warning and at most
``timeout`` seconds; it never changes the run's exit code.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any, Mapping

from . import __version__
from .config import redact_webhook
from .exitcodes import EXIT_ABORTED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE
from .wording import plural

log = logging.getLogger("capbatch.notify")

TIMEOUT = 5.0
OUTCOME = {EXIT_OK: "done", EXIT_ROWS_FAILED: "done, some rows failed or were rejected",
           EXIT_USAGE: "refused (usage, config or input)", EXIT_ABORTED: "aborted (resumable)",
           EXIT_INTERNAL: "internal error", EXIT_INTERRUPTED: "interrupted (resumable)"}


def message(*, job: str | None, input_name: str | None, exit_code: int, summary: Mapping[str, Any] | None,
            error: str | None = None, report_path: str | None = None) -> str:
    """Three short lines: what ended and how, the counts, the exit code and where the report is."""
    what = f"capbatch {'job ' + job if job else 'run'}" + (f" ({input_name})" if input_name else "")
    lines = [f"{what}: {OUTCOME.get(exit_code, 'ended')}"]
    if summary:
        c = summary.get("counts") or {}
        left = c.get("pending", 0) + c.get("in_flight", 0)
        lines[0] += (f" — {c.get('succeeded', 0)} succeeded, {c.get('unchanged', 0)} unchanged, "
                     f"{c.get('failed', 0)} failed, {c.get('rejected', 0)} rejected"
                     + (f", {left} left" if left else ""))
        lines.append(f"{plural(int(summary.get('requests') or 0), 'request')} in "
                     f"{float(summary.get('duration_seconds') or 0):.1f} s, "
                     f"{float(summary.get('throughput_rows_per_second') or 0):.1f} rows/s")
    if error:
        lines.append(error.splitlines()[0])
    lines.append(f"exit code {exit_code}" + (f"; report: {report_path}" if report_path else ""))
    return "\n".join(lines)


def send(url: str, text: str, timeout: float = TIMEOUT) -> bool:
    """POST ``{"text": text}``. Returns whether the webhook took it; a failure is logged as a warning."""
    body = json.dumps({"text": text}).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"capbatch/{__version__}"})
    where = redact_webhook(url)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read(1024)
    except urllib.error.HTTPError as exc:
        log.warning("notification to %s refused (HTTP %d); the run's result is unaffected", where, exc.code)
        return False
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        log.warning("notification to %s failed (%s); the run's result is unaffected", where, reason)
        return False
    log.debug("notification sent to %s", where)
    return True
