"""Small helpers for messages people read: counts with the right singular or plural, and advice
said in more than one place (the log and report.html)."""

from __future__ import annotations


def plural(n: int | None, word: str, plural_form: str | None = None) -> str:
    """``plural(1, "row")`` -> "1 row"; ``plural(3, "row")`` -> "3 rows"."""
    n = n or 0
    return f"{n} {word if n == 1 else (plural_form or word + 's')}"


def abort_advice(counts: dict[str, int]) -> str:
    """What an aborted run (exit 3: the canary, the tripwire, credentials, an outage) means and what to
    do. Its failed rows show why it stopped; they are not input to fix in failures.csv."""
    left = counts.get("pending", 0) + counts.get("in_flight", 0)
    failed = counts.get("failed", 0)
    evidence = (f"; the failed {'row shows' if failed == 1 else 'rows show'} why, not input to fix" if failed else "")
    return (f"the run stopped early (exit 3) to spare the {plural(left, 'row')} not sent yet{evidence}. "
            "Check what the reason above names: the API contract (what the org answers, the fields it needs: "
            "--extra-field), the credentials, the target; then rerun the same command to resume"
            + (" (add --retry-failed to send the failed rows again)" if failed else ""))
