"""Command line: flags → Settings → one library call → exit code. No business logic here."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__, config, report, runner
from .errors import CapbatchError, UsageError
from .exitcodes import EXIT_INTERNAL, EXIT_INTERRUPTED
from .wording import plural

log = logging.getLogger("capbatch")

EXIT_CODES_HELP = """Exit codes: 0 every row settled successfully; 1 some rows failed or were rejected;
2 usage, config or input-file error (nothing sent); 3 run stopped (credentials, unreachable target,
outage, canary, tripwire), resumable by rerunning the same command; 70 internal error (a bug: the
message names the traceback file); 130 interrupted (a run resumes when rerun)."""
SUMMARY_LOGGER = "capbatch.summary"   # its lines are shown even with -q


def setup_logging(quiet: bool, verbose: int) -> None:
    """INFO by default; -v adds DEBUG lines; -q keeps warnings, errors and the final summary line."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("capbatch")
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        if getattr(h, "_capbatch_console", False):
            root.removeHandler(h)
    handler = _TqdmAwareHandler()
    handler._capbatch_console = True  # type: ignore[attr-defined]
    handler.setLevel(level)
    if quiet:
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name == SUMMARY_LOGGER)
    handler.setFormatter(logging.Formatter("%(message)s" if sys.stderr.isatty() else
                                           "%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root.addHandler(handler)
    root.propagate = False


class _TqdmAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes through tqdm so log lines never tear a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except BrokenPipeError:   # stderr closed (`... 2>&1 | head`): stay quiet
            _silence(sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _silence(stream: Any) -> None:
    """The reader of ``stream`` went away: point it at /dev/null so nothing (not even the interpreter's
    final flush) complains about the broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def echo(text: str) -> None:
    """Print to stdout; a closed pipe (`capbatch status RD | head -1`) ends the output quietly."""
    try:
        click.echo(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence(sys.stdout)


_SECRET_OPTION = re.compile(r"password|secret|token|key|auth", re.I)


def redacted_argv(argv: list[str]) -> list[str]:
    """The command line as a crash log may keep it: no values of secret-looking options, no webhook
    paths, and no user, password or query of any URL (a --ledger URL may carry its password)."""
    out: list[str] = []
    option = ""
    for arg in argv:
        name, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if arg.startswith("-") and not eq:
            out.append(arg)
            option = arg
            continue
        key = name or option
        if _SECRET_OPTION.search(key):
            value = "***"
        elif key == "--notify-url":
            value = config.redact_webhook(value)
        elif "://" in value:
            value = config.redact_url(value)
        out.append(f"{name}={value}" if eq else value)
        option = ""
    return out


def _crash_log() -> str | None:
    """Write the current exception's traceback to a file of its own; return its path."""
    try:
        fd, path = tempfile.mkstemp(prefix=f"capbatch-internal-error-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"capbatch {__version__}, python {sys.version.split()[0]}, argv {redacted_argv(sys.argv[1:])}\n")
            fh.write(traceback.format_exc())
        return path
    except OSError:
        return None


def _guard(fn: Callable[..., int]) -> Callable[..., None]:
    """Every CapbatchError becomes its message + hint and its exit code; never a traceback."""
    is_run = fn.__name__ in ("run_cmd", "revert_cmd")   # the commands that resume when rerun

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except CapbatchError as exc:
            _say(f"capbatch: {exc}")
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            _say("capbatch: interrupted; rerun the same command to resume" if is_run else "capbatch: interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            _silence(sys.stdout)
            sys.exit(0)
        except Exception as exc:  # a bug: say so plainly, and where the traceback is
            log.debug("internal error", exc_info=True)
            where = _crash_log()
            text = (f"capbatch: internal error ({exc.__class__.__name__}: {exc}). This is a bug in capbatch, "
                    "not a problem with your input or settings. ")
            text += f"The traceback is in {where}; please report it with that file." if where else \
                "Rerun with -v to see the traceback and please report it."
            if is_run:
                text += " The ledger is consistent: rerunning the same command resumes the run."
            _say(text)
            sys.exit(EXIT_INTERNAL)
        sys.exit(code)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _say(text: str) -> None:
    try:
        click.echo(text, err=True)
    except BrokenPipeError:
        _silence(sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="capbatch")
def main() -> None:
    """capbatch: backfill loyalty-card external IDs into Capillary from CSV/Excel files.

    Credentials come from the environment only: CAPILLARY_USERNAME + CAPILLARY_PASSWORD (Basic)
    or CAPILLARY_CLIENT_KEY + CAPILLARY_CLIENT_SECRET (OAuth).
    """


def input_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--card-column", help="Header of the card-number column (default: cardNumber, matched loosely)."),
        click.option("--external-id-column", help="Header of the external-ID column (default: cardExternalId)."),
        click.option("--delimiter", help="CSV delimiter (default: detected among , ; TAB |). Use '\\t' for tab."),
        click.option("--encoding", help="Text encoding (default: UTF-8/UTF-16 by BOM, else cp1252, reported)."),
        click.option("--sheet", help="Workbook sheet NAME, 0-based INDEX, or 'all' = every visible sheet with the columns, in workbook order (default: the one visible sheet with the columns; several are refused)."),
        click.option("--header-row", type=int, help="1-based row holding the headers (default 1)."),
        click.option("--external-id-length", type=int, help="Your org's CONF_CARD_NUMBER_LENGTH: reject other lengths before sending."),
        click.option("--external-id-min-length", metavar="N|card", help="Reject external IDs shorter than N, or than the row's card number ('card'); error 3050."),
        click.option("--external-id-pattern", help="Regex every external ID must match in full."),
        click.option("--strip-invisible/--no-strip-invisible", default=None, help="Strip zero-width/control characters instead of rejecting the row (default: reject)."),
        click.option("--reports-dir", type=click.Path(path_type=Path), help="Where run directories go (default ./reports)."),
    ]
    for option in reversed(options):
        f = option(f)
    return general_flags(f)


def general_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    """The settings file and how much is said: every command that runs something."""
    options = [
        click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file (default ./capbatch.toml if present)."),
        click.option("-q", "--quiet", is_flag=True, default=None, help="Only warnings, errors and the final summary line."),
        click.option("-v", "--verbose", count=True, help="Add debug lines (settings and where each came from, retries, notifications)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def plan_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    """When a run may send and what it must finish by (capbatch.plan, capbatch.window)."""
    options = [
        click.option("--window", "windows", multiple=True, metavar="HH:MM-HH:MM",
                     help="Send only inside this daily window (repeatable; may cross midnight, e.g. 22:00-06:00)."),
        click.option("--timezone", help="IANA time zone of --window and --deadline (default: local time), e.g. Europe/Berlin."),
        click.option("--deadline", metavar="TIME", help="Warn when the plan cannot finish by TIME: 06:00, '2026-12-01 06:00' or 8h."),
        click.option("--deadline-strict/--no-deadline-strict", default=None, help="Refuse to start (exit 2) when the plan cannot meet --deadline."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def quota_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    """Sharing the key's quota with other runs on this host (capbatch.quota)."""
    options = [
        click.option("--window-exit/--no-window-exit", default=None, help="Outside the windows exit 0 at once; when a window closes mid-run stop there (exit 3, resumable)."),
        click.option("--quota-dir", type=click.Path(path_type=Path), help="Where runs on this host share each API key's quota (default: the user state dir; 'none' paces alone)."),
        click.option("--priority", type=int, help="This run's share of a quota shared with other runs (default 1; 2 gets twice the turns)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _settings(flags: dict[str, Any], input_path: Path | None = None) -> config.Settings:
    config_file = flags.pop("config_file", None)
    if flags.get("delimiter") in ("\\t", "tab", "TAB"):
        flags["delimiter"] = "\t"
    if flags.get("verbose") == 0:
        flags["verbose"] = None
    if input_path is not None:
        flags["input"] = input_path
    settings = config.resolve(flags, os.environ, config_file)
    for key, value in settings.public_dict().items():
        log.debug("setting %s = %s (%s)", key, "-" if value is None else value, settings.sources.get(key, "default"))
    return settings


def outside_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    """Where a run reports to besides its run directory: metrics and a chat webhook."""
    options = [
        click.option("--metrics-file", type=click.Path(path_type=Path, dir_okay=False), help="Write the run's figures in the Prometheus text format to this file (atomically; name it *.prom in node_exporter's textfile directory), at the start, every --progress-interval and at the end."),
        click.option("--pushgateway", metavar="URL", help="Push the same figures to this Prometheus Pushgateway at the end (grouped by job)."),
        click.option("--notify-url", metavar="URL", help="POST a short JSON message ({\"text\": ...}: Slack/Teams incoming webhook) when the run ends, is aborted or interrupted. A failing webhook is only a warning."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


AUTH_HELP = "Which credentials to use when both Basic and OAuth pairs are in the environment (otherwise refused)."
TLS_HELP = "Turn TLS certificate verification off (trusted test hosts only; only this flag can do that)."


def send_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    """Where and how a command sends (run, revert): the target, the pace, the retries, the progress."""
    options = [
        click.option("--cluster", type=click.Choice(sorted(config.CLUSTERS), case_sensitive=False),
                     help=f"Capillary cluster: {config.CLUSTER_NAMES_HELP}. revert: the run's own unless given; another is refused."),
        click.option("--base-url", help="API base URL instead of --cluster (a test cluster, a proxy, the simulator). "
                                        "revert: the run's own unless given; another is refused."),
        click.option("--rate", help=f"Request rate cap, e.g. 1000/min or 20/s; 'unlimited' for none (default {config.DEFAULT_RATE})."),
        click.option("--read-rate", help="Separate cap for reads (GET) (default: reads share --rate)."),
        click.option("--concurrency", type=int, help="Requests in flight at most (default 16)."),
        click.option("--max-attempts", type=int, help="Attempts per request for transient errors (default 8)."),
        click.option("--timeout", type=float, help="Seconds per request (default 30)."),
        click.option("--outage-budget", type=float, help="Seconds the API may stay down before the run aborts (default 300)."),
        click.option("--grace-period", type=float, help="Seconds in-flight requests get after Ctrl-C/SIGTERM (default 10)."),
        click.option("--allow-http", is_flag=True, default=None, help="Allow plain http:// to a non-loopback host."),
        click.option("--no-verify-tls", "no_verify_tls", is_flag=True, default=False, help=TLS_HELP),
        click.option("--auth", type=click.Choice(config.AUTH_KINDS), help=AUTH_HELP),
        click.option("--progress", type=click.Choice(config.PROGRESS_MODES), help="auto: a bar on a terminal, log lines otherwise; bar; lines; none (default auto)."),
        click.option("--progress-interval", type=float, help="Seconds between progress lines when not on a terminal, and between --metrics-file updates (default 10)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command("run", epilog=EXIT_CODES_HELP)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--run-dir", type=click.Path(path_type=Path), help="Run directory (default reports/<input>-<hash>).")
@click.option("--mode", type=click.Choice(config.MODES), help="backfill (default): PUT every row; reconcile: read first, PUT only what differs.")
@click.option("--resume-check", type=click.Choice(config.RESUME_CHECKS), help="Rows in flight when a run died: read the card first or resend (default read).")
@click.option("--generate-missing/--no-generate-missing", default=None, help="Rows with an empty external ID get one from GET /v2/cardNumber (default: such rows are rejected).")
@click.option("--extra-field", "extra_fields", multiple=True, metavar="NAME=VALUE",
              help="Constant field added to every PUT (repeatable), e.g. statusLabel=Active; NAME:=JSON for a "
                   "number or object (seriesId:=3). Never cardNumber/cardExternalId.")
@click.option("--read-back/--no-read-back", default=None,
              help="Read every card after its PUT and count it succeeded only if it holds the ID (one more "
                   "request per row; for orgs whose answers cannot be taken at their word).")
@click.option("--canary", type=int, metavar="K",
              help=f"Before the pool opens, send K rows one at a time and read each card back; stop (exit 3) if "
                   f"the API does not do what it answers (default {config.DEFAULT_CANARY}; 0 skips; "
                   "not run against loopback unless given).")
@click.option("--tripwire/--no-tripwire", default=None,
              help="Stop (exit 3) when the first settled rows nearly all fail with one permanent code (default on).")
@click.option("--tripwire-rate", type=float, help="Share of the sample one failure code must reach (default 0.9).")
@click.option("--tripwire-rows", type=int, help="Settled rows the tripwire watches (default 50).")
@click.option("--dry-run", is_flag=True, default=None, help="Validate only; send nothing.")
@click.option("--check-remote", is_flag=True, default=None, help="With --dry-run: also read every card and report which do not exist and which already hold their ID.")
@click.option("--job", help="Job name tying nightly runs together (state store beside the run directories).")
@click.option("--skip-confirmed/--no-skip-confirmed", default=None, help="With --job: settle pairs an earlier run confirmed without any request.")
@click.option("--ledger", help="Keep the ledger in PostgreSQL: postgresql://USER@HOST:PORT/DB (password from PGPASSWORD or ~/.pgpass); needs --job. Several workers may run the same command.")
@click.option("--audit-fraction", type=float, help="With --skip-confirmed: re-read this share of the confirmed pairs each run (e.g. 0.05), longest unchecked first, and put back any ID that drifted.")
@click.option("--retry-failed", is_flag=True, default=None, help="Send the rows of this run that failed again (e.g. cards created since); rejected rows stay rejected.")
@click.option("--record-previous/--no-record-previous", default=None, help="Read each card before writing it and record the ID it held, so `capbatch revert` can put it back (one read per row).")
@click.option("--json", "json_out", is_flag=True, default=False, help="Print the summary as JSON on stdout.")
@send_flags
@plan_flags
@quota_flags
@outside_flags
@input_flags
@_guard
def run_cmd(input_path: Path, no_verify_tls: bool, json_out: bool, **flags: Any) -> int:
    """Validate INPUT and set each card's external ID; rerun the same command to resume."""
    if no_verify_tls:
        flags["verify_tls"] = False
    setup_logging(bool(flags.get("quiet")), flags.get("verbose") or 0)
    settings = _settings(flags, input_path)
    summary = runner.run(settings)
    if json_out:
        echo(json.dumps(summary, indent=2))
    return int(summary["exit_code"])


@main.command("validate", epilog=EXIT_CODES_HELP)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Validation CSV to write (default reports/<input>.validation.csv; '-' for stdout).")
@click.option("--json", "json_out", is_flag=True, default=False, help="Print the counts as JSON on stdout.")
@click.option("--rate", help=f"The rate the plan assumes (default {config.DEFAULT_RATE}).")
@plan_flags
@input_flags
@_guard
def validate_cmd(input_path: Path, output: Path | None, json_out: bool, **flags: Any) -> int:
    """Check INPUT without any network: counts, first problems, and a validation CSV (exit 0/1/2)."""
    try:
        if json_out and output is not None and str(output) == "-":
            raise UsageError("--json and -o - would both write to stdout",
                             "write the validation CSV to a file, or drop --json")
        setup_logging(bool(flags.get("quiet")), flags.get("verbose") or 0)
        settings = _settings(flags, input_path)
        result = runner.validate(settings, output)
    except CapbatchError as exc:
        if json_out:   # a refusal is a verdict too: a script reads why on stdout, not only from stderr
            echo(json.dumps(_refusal(exc, input_path), indent=2))
        raise
    if json_out:
        echo(json.dumps(result, indent=2))
    return int(result["exit_code"])


def _refusal(exc: CapbatchError, input_path: Path) -> dict[str, Any]:
    """validate --json's answer when the input as a whole is refused (exit 2): the error and its fix,
    and what the error knows beside them (a workbook's census of sheets)."""
    return {"input": str(input_path), "exit_code": exc.exit_code, "refused": True, "error": exc.message,
            "fix": exc.hint, **exc.details}


@main.command("verify", epilog=EXIT_CODES_HELP)
@click.argument("target", metavar="RUN_DIR|INPUT", type=click.Path(path_type=Path, exists=True), required=False)
@click.option("--ledger", help="Database ledger (postgresql://USER@HOST:PORT/DB) to read instead of RUN_DIR; with --job.")
@click.option("--job", help="With --ledger: the job whose latest run to check.")
@click.option("--cluster", type=click.Choice(sorted(config.CLUSTERS), case_sensitive=False),
              help=f"Capillary cluster: {config.CLUSTER_NAMES_HELP}.")
@click.option("--base-url", help="API base URL instead of --cluster (a test cluster, a proxy, the simulator).")
@click.option("--rate", help=f"Read rate cap, e.g. 1000/min; 'unlimited' for none (default {config.DEFAULT_RATE}).")
@click.option("--concurrency", type=int, help="Reads in flight at most (default 16).")
@click.option("--quota-dir", type=click.Path(path_type=Path), help="Where runs on this host share each API key's quota; the reads take turns on it (default: the user state dir; 'none' paces alone).")
@click.option("--priority", type=int, help="The reads' share of a quota shared with runs on the key (default 1).")
@click.option("--allow-http", is_flag=True, default=None, help="Allow plain http:// to a non-loopback host.")
@click.option("--no-verify-tls", "no_verify_tls", is_flag=True, default=False, help=TLS_HELP)
@click.option("--auth", type=click.Choice(config.AUTH_KINDS), help=AUTH_HELP)
@click.option("--json", "json_out", is_flag=True, default=False, help="Print the counts as JSON on stdout.")
@input_flags
@_guard
def verify_cmd(target: Path, no_verify_tls: bool, json_out: bool, **flags: Any) -> int:
    """Read every card back and report any whose external ID differs from the intended one (exit 1). Read-only."""
    if no_verify_tls:
        flags["verify_tls"] = False
    setup_logging(bool(flags.get("quiet")), flags.get("verbose") or 0)
    settings = _settings(flags)
    result = runner.verify(settings, target)
    if json_out:
        echo(json.dumps(result, indent=2))
    return int(result["exit_code"])


@main.command("history")
@click.option("--job", required=True, help="Job name given to `capbatch run --job`.")
@click.option("--ledger", envvar="CAPBATCH_LEDGER", help="The job's database ledger (postgresql://USER@HOST:PORT/DB).")
@click.option("--reports-dir", type=click.Path(path_type=Path), help="Where the run directories are (default ./reports, or the configured one).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file (default ./capbatch.toml if present).")
@click.option("--json", "json_out", is_flag=True, default=False, help="Print the runs as JSON on stdout (timestamps ISO 8601 UTC).")
@_guard
def history_cmd(job: str, ledger: str | None, reports_dir: Path | None, config_file: Path | None,
                json_out: bool) -> int:
    """List a job's runs with their counts."""
    from . import jobs

    reports_dir = config.resolve({"reports_dir": reports_dir}, os.environ, config_file).reports_dir
    where: Any = reports_dir
    if ledger:
        from .ledger import redact_password

        where = redact_password(ledger)
    runs = jobs.history(ledger, reports_dir, jobs.check_name(job))
    if json_out:
        echo(json.dumps([{**r, "started_at": report.iso(r.get("started_at")),
                          "ended_at": report.iso(r["ended_at"]) if r.get("ended_at") else None}
                         for r in runs], indent=2))
        return 0
    if not runs:
        echo(f"no runs recorded for job '{job}' under {where}")
        return 0
    memory = jobs.describe(ledger, reports_dir, job)
    if memory["confirmed_pairs"]:
        oldest = time.strftime("%Y-%m-%d %H:%M", time.localtime(memory["oldest_check"]))
        click.echo(f"job {job} -> {memory['target'] or '?'}: {memory['confirmed_pairs']} confirmed pairs, "
                   f"longest unchecked since {oldest}")
    for r in runs:
        c = r["counts"]
        began = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"] or 0))
        if not r.get("recorded", True):   # no summary: killed, or an error before the end
            echo(f"{began}  {_unrecorded_outcome(r)}  {r['requests'] or 0:>8} requests  "
                 f"{_settled_text(r['settled'])}  {r['input_name']}  {r['run_dir']}")
            continue
        echo(f"{began}  exit {r['exit_code']}  {r['requests'] or 0:>8} requests  "
                   f"succeeded={c.get('succeeded', 0)} unchanged={c.get('unchanged', 0)} "
                   f"failed={c.get('failed', 0)} rejected={c.get('rejected', 0)}  {r['input_name']}  {r['run_dir']}")
    return 0


def _unrecorded_outcome(line: dict[str, Any]) -> str:
    if line["outcome"] == "running":
        return "still running (no summary yet)"
    how = "interrupted (killed)" if line["outcome"] == "killed" else f"{line['outcome']}, exit {line['exit_code']}"
    return f"ended without a summary: {how}"


def _settled_text(settled: dict[str, int]) -> str:
    """'settled 120 rows (succeeded=118 failed=2)' for the rows one invocation settled."""
    total = sum(settled.values())
    detail = " ".join(f"{state}={n}" for state, n in sorted(settled.items()))
    return f"settled {plural(total, 'row')}" + (f" ({detail})" if detail else "")


@main.command("forget")
@click.option("--job", required=True, help="Job name given to `capbatch run --job`.")
@click.option("--card", "cards", multiple=True, help="Forget only this card (repeatable) (default: every pair and the job's target).")
@click.option("--ledger", envvar="CAPBATCH_LEDGER", help="The job's database ledger (postgresql://USER@HOST:PORT/DB): its memory is there.")
@click.option("--reports-dir", type=click.Path(path_type=Path), help="Where the job store is (default ./reports, or the configured one).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file (default ./capbatch.toml if present).")
@_guard
def forget_cmd(job: str, cards: tuple[str, ...], ledger: str | None, reports_dir: Path | None,
               config_file: Path | None) -> int:
    """Reset a job's memory: its next run sends (or reads) those rows again. The run history is kept."""
    from . import jobs

    reports_dir = config.resolve({"reports_dir": reports_dir}, os.environ, config_file).reports_dir
    if ledger:   # a database job: its memory is in the database, shared by every host
        n = jobs.forget(ledger, reports_dir, jobs.check_name(job), cards)
    else:
        with jobs.lock(reports_dir, jobs.check_name(job)):
            n = jobs.forget(None, reports_dir, job, cards)
    what = f"{n} of the {plural(len(cards), 'card')} given" if cards else f"all {plural(n, 'confirmed pair')} and its target"
    click.echo(f"job {job}: forgot {what}; its next run with --skip-confirmed sends those rows again")
    return 0


@main.command("revert", epilog=EXIT_CODES_HELP)
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--dry-run", is_flag=True, default=None, help="Write RUN_DIR/revert.dry-run.csv (what would be set back, what cannot be); send nothing.")
@click.option("--retry-failed", is_flag=True, default=None, help="Send the rows whose revert failed again.")
@click.option("--json", "json_out", is_flag=True, default=False, help="Print the summary as JSON on stdout.")
@send_flags
@general_flags
@_guard
def revert_cmd(run_dir: Path, no_verify_tls: bool, json_out: bool, **flags: Any) -> int:
    """Put back the external IDs the run in RUN_DIR replaced, where the card still holds the run's ID.

    The revert is a run of its own in RUN_DIR/revert (ledger and reports); rerun it to resume.
    """
    from .revert import revert

    if no_verify_tls:
        flags["verify_tls"] = False
    setup_logging(bool(flags.get("quiet")), flags.get("verbose") or 0)
    summary = revert(_settings(flags), run_dir)
    if json_out:
        echo(json.dumps(summary, indent=2))
    return int(summary["exit_code"])


@main.command("status")
@click.argument("run_dir", type=click.Path(path_type=Path), required=False)
@click.option("--ledger", envvar="CAPBATCH_LEDGER", help="Database ledger (postgresql://USER@HOST:PORT/DB) instead of RUN_DIR; with --job.")
@click.option("--job", help="With --ledger: the job whose latest run to show.")
@click.option("--json", "json_out", is_flag=True, default=False, help="Print counts and invocations as JSON on stdout (timestamps ISO 8601 UTC, as in summary.json).")
@_guard
def status_cmd(run_dir: Path | None, ledger: str | None, job: str | None, json_out: bool) -> int:
    """Counts per state from RUN_DIR's ledger, or a job's in a database (safe while a run is in progress; read-only)."""
    st = runner.status(run_dir, ledger if (job or not run_dir) else None, job)
    if json_out:
        echo(json.dumps(st, indent=2))
        return 0
    echo(f"run directory: {st['run_dir']}  input: {st['input'] or '-'}")
    if job:
        echo(f"ledger: {st['ledger']}  job: {job}")
    total = sum(st["counts"].values())
    for state, n in st["counts"].items():
        echo(f"  {state:<10} {n:>10}  {100.0 * n / max(total, 1):5.1f}%")
    echo(f"  {'total':<10} {total:>10}")
    for inv in st["invocations"]:
        exit_code = "-" if inv["exit_code"] is None else inv["exit_code"]
        echo(f"  invocation {inv['id']}: started {inv['started_at']}, {inv['duration']:.1f} s, "
             f"outcome {inv['outcome'] or 'running or killed'}, exit {exit_code}, {plural(inv['requests'], 'request')}")
    return 0


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path), required=False)
@click.option("--output-dir", type=click.Path(path_type=Path, file_okay=False), help="Write the reports here instead of RUN_DIR (needed when RUN_DIR is read-only).")
@click.option("--ledger", envvar="CAPBATCH_LEDGER", help="Database ledger (postgresql://USER@HOST:PORT/DB) to read; with --job. Reports go to RUN_DIR or reports/<job>/<input>-<hash>.")
@click.option("--job", help="With --ledger: the job whose latest run to report.")
@_guard
def report_cmd(run_dir: Path | None, output_dir: Path | None, ledger: str | None, job: str | None) -> int:
    """Rebuild results.csv, failures.csv, summary.json and report.html from RUN_DIR's ledger (or a job's)."""
    setup_logging(False, 0)
    summary = runner.rebuild_reports(run_dir, output_dir, ledger if (job or not run_dir) else None, job)
    echo(f"reports rebuilt in {output_dir or summary['run_dir']}: {report.status_line(summary['counts'])}")
    return 0


@main.command("simulate")
@click.option("--host", default="127.0.0.1", help="Address to listen on; loopback only (default 127.0.0.1).")
@click.option("--port", default=8080, type=click.IntRange(0, 65535), help="Port to listen on (default 8080; 0 picks a free one).")
@click.option("--cards", type=click.Path(path_type=Path, exists=True), help="CSV of seeded cards (cardNumber[,cardExternalId]).")
@click.option("--auto-create", is_flag=True, help="Every card number exists.")
@click.option("--latency", type=float, default=0.0, help="Seconds added to each answer (default 0).")
@click.option("--jitter", type=float, default=0.0, help="Random +/- seconds around --latency (default 0).")
@click.option("--rate-per-minute", type=int, help="429 beyond this many requests in any 60 s.")
@click.option("--rate-per-second", type=int, help="429 beyond this many requests in any 1 s.")
@click.option("--retry-after", type=float, help="Retry-After seconds sent with 429.")
@click.option("--p-500", type=float, default=0.0, help="Probability of an HTTP 500 answer (default 0).")
@click.option("--p-503", type=float, default=0.0, help="Probability of an HTTP 503 answer (default 0).")
@click.option("--p-drop", type=float, default=0.0, help="Probability of closing the connection without an answer (default 0).")
@click.option("--p-hang", type=float, default=0.0, help="Probability of hanging, then closing without an answer (default 0).")
@click.option("--p-429", type=float, default=0.0, help="Probability of a spurious 429 (default 0).")
@click.option("--errors-status", type=int, default=400, help="HTTP status of business errors; 200/201 mimic '2xx with errors', 500 the documented failure status (default 400).")
@click.option("--token-ttl", type=float, default=300.0, help="Seconds an OAuth token lives (default 300).")
@click.option("--down", type=click.Choice(["503", "502", "403", "drop", "hang"]), help="Start in an outage: every request answered so.")
@click.option("--business-errors", type=click.Choice(["coded", "generic"]), default="coded", help="generic: business errors carry only code 500 'All requests have failed due to errors' (default coded).")
@click.option("--fault-body", type=click.Choice(["json", "html"]), default="json", help="html: 5xx faults and --down 502/503/403 answer a CDN's HTML page (default json).")
@click.option("--p-noop", type=float, default=0.0, help="Share of PUTs answered 200 without being applied.")
@click.option("--noop-echo", type=click.Choice(["request", "stored", "omit"]), default="request", help="What a no-op answer names as cardExternalId (default request: looks applied).")
@click.option("--p-echo-other", type=float, default=0.0, help="Share of applied PUTs whose answer names another ID (or card).")
@click.option("--echo-other", type=click.Choice(["cardExternalId", "cardNumber"]), default="cardExternalId", help="Which field of those answers names something else (default cardExternalId).")
@click.option("--put-identifies-by", type=click.Choice(["cardNumber", "cardExternalId"]), default="cardNumber", help="cardExternalId: the PUT finds the card by its external ID, the older docs' reading (default cardNumber).")
@click.option("--warning-code", type=int, help="PUT answers carry this warning, e.g. 3039.")
@click.option("--warning-message", default="No update in status label", help="Message of --warning-code (default 'No update in status label').")
@click.option("--required-field", "required_fields", multiple=True, metavar="NAME", help="PUTs without this field get 403 'Mandatory field is missing' (repeatable), e.g. statusLabel.")
@_guard
def simulate_cmd(**opts: Any) -> int:
    """Run the built-in Capillary API simulator on loopback (demo credentials: demo/demo)."""
    from .simulator import SimConfig, load_cards_csv, serve

    cards_path = opts.pop("cards")
    host, port = opts.pop("host"), opts.pop("port")
    opts["required_fields"] = list(opts["required_fields"])
    if not config.is_loopback(host):
        raise UsageError(f"the simulator only listens on loopback, not {host}", "use --host 127.0.0.1")
    try:
        cards = load_cards_csv(cards_path) if cards_path else {}
    except (OSError, ValueError, csv.Error) as exc:
        raise UsageError(f"--cards {cards_path} cannot be read ({exc})",
                         "give a UTF-8 CSV with a cardNumber column (and optionally cardExternalId)") from exc
    try:
        cfg = SimConfig(cards=cards, **opts)
        cfg.validate()
    except ValueError as exc:
        name, _, rest = str(exc).partition(" ")   # "p_500 must be between 0 and 1, ..." names the option
        what = f"--{name.replace('_', '-')} {rest}" if name in opts else str(exc)
        raise UsageError(f"simulator option out of range: {what}", "see `capbatch simulate --help`") from exc
    try:
        serve(cfg, host, port)
    except OSError as exc:
        raise UsageError(f"the simulator cannot listen on {host}:{port} ({exc.strerror or exc})",
                         "choose another --port (0 picks a free one), or stop what holds this one") from exc
    return 0


@main.command("demo")
@click.option("--input", "input_path", type=click.Path(path_type=Path), help="Sample to run (default: the sample shipped with capbatch).")
@click.option("--latency", type=float, default=0.02, help="Simulated API latency in seconds (default 0.02).")
@click.option("--rate", default="1200/min", help="Request rate cap (default 1200/min).")
@click.option("--progress", type=click.Choice(config.PROGRESS_MODES), default="auto", help="auto, bar, lines or none (default auto).")
@_guard
def demo_cmd(input_path: Path | None, latency: float, rate: str, progress: str) -> int:
    """Run the whole job end to end against the built-in simulator: no credentials, no network."""
    from .demo import run_demo

    setup_logging(False, 0)
    return run_demo(input_path, latency, rate, progress)


@main.command("config")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file (default ./capbatch.toml if present).")
@_guard
def config_cmd(config_file: Path | None) -> int:
    """Print the effective settings, where each came from, and the credentials (masked)."""
    setup_logging(False, 0)
    settings = config.resolve({}, os.environ, config_file)
    public = settings.public_dict()
    for key, value in public.items():
        origin = settings.sources.get(key, "default")
        shown = "-" if value is None else value
        echo(f"{key:<22} {shown!s:<40} ({origin})")
    echo(f"{'credentials':<22} {settings.credentials.describe()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
