"""The exit codes, in one place: the CLI exits with them, summaries, metrics and webhooks report them."""

from __future__ import annotations

EXIT_OK = 0                # every row settled successfully
EXIT_ROWS_FAILED = 1       # every row settled, some failed or were rejected
EXIT_USAGE = 2             # usage, config or input error: nothing sent
EXIT_ABORTED = 3           # stopped (aborted, paused, ledger lost): resumable by rerunning the same command
EXIT_INTERNAL = 70         # EX_SOFTWARE: a bug in capbatch, never a verdict on the input
EXIT_INTERRUPTED = 130     # interrupted by a signal: a run resumes when rerun

COMPLETED = (EXIT_OK, EXIT_ROWS_FAILED)   # every row settled
