"""Command line: flags → Settings → one library call → exit code. No business logic here."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__, config, report, runner
from .errors import CapbatchError, UsageError

log = logging.getLogger("capbatch")

EXIT_CODES_HELP = """Exit codes: 0 every row settled successfully; 1 some rows failed or were rejected;
2 usage, config or input-file error (nothing sent); 3 run stopped (credentials, unreachable target,
outage, canary, tripwire), resumable;
130 interrupted, resumable. Rerunning the same command resumes."""


def setup_logging(quiet: bool, verbose: int) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger("capbatch")
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        if getattr(h, "_capbatch_console", False):
            root.removeHandler(h)
    handler = _TqdmAwareHandler()
    handler._capbatch_console = True  # type: ignore[attr-defined]
    handler.setLevel(level)
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
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _guard(fn: Callable[..., int]) -> Callable[..., None]:
    """Every CapbatchError becomes its message + hint and its exit code; never a traceback."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except CapbatchError as exc:
            click.echo(f"capbatch: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("capbatch: interrupted; rerun the same command to resume", err=True)
            sys.exit(report.EXIT_INTERRUPTED)
        except Exception as exc:  # a bug: say so plainly, keep the details for -v
            log.debug("internal error", exc_info=True)
            click.echo(f"capbatch: internal error ({exc.__class__.__name__}: {exc}). The ledger is consistent: "
                       "rerun the same command to resume; rerun with -v for details and please report it",
                       err=True)
            sys.exit(report.EXIT_ABORTED)
        sys.exit(code)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


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
        click.option("--sheet", help="Excel sheet name or 0-based index (default: the sheet holding the headers)."),
        click.option("--header-row", type=int, help="1-based row holding the headers (default 1)."),
        click.option("--external-id-length", type=int, help="Your org's CONF_CARD_NUMBER_LENGTH: reject other lengths before sending."),
        click.option("--external-id-pattern", help="Regex every external ID must match in full."),
        click.option("--strip-invisible/--no-strip-invisible", default=None, help="Strip zero-width/control characters instead of rejecting the row."),
        click.option("--reports-dir", type=click.Path(path_type=Path), help="Where run directories go (default ./reports)."),
        click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file (default ./capbatch.toml if present)."),
        click.option("-q", "--quiet", is_flag=True, default=None, help="Only warnings, errors and the final summary line."),
        click.option("-v", "--verbose", count=True, help="More detail."),
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
    return config.resolve(flags, os.environ, config_file)


@main.command("run", epilog=EXIT_CODES_HELP)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--cluster", type=click.Choice(sorted(config.CLUSTERS), case_sensitive=False),
              help=f"Capillary cluster: {config.CLUSTER_NAMES_HELP}.")
@click.option("--base-url", help="API base URL instead of --cluster (a test cluster, a proxy, the simulator).")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Run directory (default reports/<input>-<hash>).")
@click.option("--mode", type=click.Choice(config.MODES), help="backfill (default): PUT every row; reconcile: read first, PUT only what differs.")
@click.option("--rate", help=f"Request rate cap, e.g. 1000/min or 20/s; 'unlimited' for none (default {config.DEFAULT_RATE}).")
@click.option("--read-rate", help="Separate cap for reads (GET); default: reads share --rate.")
@click.option("--concurrency", type=int, help="Requests in flight at most (default 16).")
@click.option("--max-attempts", type=int, help="Attempts per request for transient errors (default 8).")
@click.option("--timeout", type=float, help="Seconds per request (default 30).")
@click.option("--resume-check", type=click.Choice(config.RESUME_CHECKS), help="Rows in flight when a run died: read the card first (default) or resend.")
@click.option("--generate-missing/--no-generate-missing", default=None, help="Rows with an empty external ID get one from GET /v2/cardNumber.")
@click.option("--outage-budget", type=float, help="Seconds the API may stay down before the run aborts (default 300).")
@click.option("--grace-period", type=float, help="Seconds in-flight requests get after Ctrl-C/SIGTERM (default 10).")
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
@click.option("--allow-http", is_flag=True, default=None, help="Allow plain http:// to a non-loopback host.")
@click.option("--no-verify-tls", "no_verify_tls", is_flag=True, default=False, help="Turn TLS verification off (trusted test hosts only).")
@click.option("--progress", type=click.Choice(config.PROGRESS_MODES), help="auto (bar on a terminal, log lines otherwise), bar, lines, none.")
@click.option("--progress-interval", type=float, help="Seconds between progress lines when not on a terminal (default 10).")
@click.option("--dry-run", is_flag=True, default=None, help="Validate only; send nothing.")
@click.option("--check-remote", is_flag=True, default=None, help="With --dry-run: also read every card and report which do not exist and which already hold their ID.")
@click.option("--job", help="Job name tying nightly runs together (state store beside the run directories).")
@click.option("--skip-confirmed/--no-skip-confirmed", default=None, help="With --job: settle pairs an earlier run confirmed without any request.")
@click.option("--audit-fraction", type=float, help="With --skip-confirmed: re-read this share of the confirmed pairs each run (e.g. 0.05), longest unchecked first, and put back any ID that drifted.")
@click.option("--retry-failed", is_flag=True, default=None, help="Send the rows of this run that failed again (e.g. cards created since); rejected rows stay rejected.")
@click.option("--record-previous/--no-record-previous", default=None, help="Read each card before writing it and record the ID it held, so `capbatch revert` can put it back (one read per row).")
@click.option("--json", "json_out", is_flag=True, default=False, help="Print the summary as JSON on stdout.")
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
        click.echo(json.dumps(summary, indent=2))
    return int(summary["exit_code"])


@main.command("validate", epilog=EXIT_CODES_HELP)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Validation CSV to write (default reports/<input>.validation.csv).")
@click.option("--json", "json_out", is_flag=True, default=False, help="Print the counts as JSON on stdout.")
@input_flags
@_guard
def validate_cmd(input_path: Path, output: Path | None, json_out: bool, **flags: Any) -> int:
    """Check INPUT without any network: counts, first problems, and a validation CSV (exit 0/1/2)."""
    setup_logging(bool(flags.get("quiet")), flags.get("verbose") or 0)
    settings = _settings(flags, input_path)
    result = runner.validate(settings, output)
    if json_out:
        click.echo(json.dumps(result, indent=2))
    return int(result["exit_code"])


@main.command("verify", epilog=EXIT_CODES_HELP)
@click.argument("target", metavar="RUN_DIR|INPUT", type=click.Path(path_type=Path, exists=True))
@click.option("--cluster", type=click.Choice(sorted(config.CLUSTERS), case_sensitive=False),
              help=f"Capillary cluster: {config.CLUSTER_NAMES_HELP}.")
@click.option("--base-url")
@click.option("--rate", help=f"Read rate cap (default {config.DEFAULT_RATE}; 'unlimited' for none).")
@click.option("--concurrency", type=int)
@click.option("--allow-http", is_flag=True, default=None)
@click.option("--no-verify-tls", "no_verify_tls", is_flag=True, default=False)
@click.option("--json", "json_out", is_flag=True, default=False)
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
        click.echo(json.dumps(result, indent=2))
    return int(result["exit_code"])


@main.command("history")
@click.option("--job", required=True, help="Job name given to `capbatch run --job`.")
@click.option("--reports-dir", type=click.Path(path_type=Path), help="Where the run directories are (default ./reports, or the configured one).")
@click.option("--config", "config_file", type=click.Path(path_type=Path))
@click.option("--json", "json_out", is_flag=True, default=False)
@_guard
def history_cmd(job: str, reports_dir: Path | None, config_file: Path | None, json_out: bool) -> int:
    """List a job's runs with their counts."""
    from . import jobs

    reports_dir = config.resolve({"reports_dir": reports_dir}, os.environ, config_file).reports_dir
    runs = jobs.history(jobs.store_path(reports_dir), jobs.check_name(job))
    if json_out:
        click.echo(json.dumps(runs, indent=2))
        return 0
    if not runs:
        click.echo(f"no runs recorded for job {job!r} under {reports_dir}")
        return 0
    memory = jobs.describe(jobs.store_path(reports_dir), job)
    if memory["confirmed_pairs"]:
        oldest = time.strftime("%Y-%m-%d %H:%M", time.localtime(memory["oldest_check"]))
        click.echo(f"job {job} -> {memory['target'] or '?'}: {memory['confirmed_pairs']} confirmed pairs, "
                   f"longest unchecked since {oldest}")
    for r in runs:
        c = r["counts"]
        began = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"] or 0))
        click.echo(f"{began}  exit {r['exit_code']}  {r['requests'] or 0:>8} requests  "
                   f"succeeded={c.get('succeeded', 0)} unchanged={c.get('unchanged', 0)} "
                   f"failed={c.get('failed', 0)} rejected={c.get('rejected', 0)}  {r['input_name']}  {r['run_dir']}")
    return 0


@main.command("forget")
@click.option("--job", required=True, help="Job name given to `capbatch run --job`.")
@click.option("--card", "cards", multiple=True, help="Forget only this card (repeatable); default: every pair and the job's target.")
@click.option("--reports-dir", type=click.Path(path_type=Path), help="Where the job store is (default ./reports, or the configured one).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file (default ./capbatch.toml if present).")
@_guard
def forget_cmd(job: str, cards: tuple[str, ...], reports_dir: Path | None, config_file: Path | None) -> int:
    """Reset a job's memory: its next run sends (or reads) those rows again. The run history is kept."""
    from . import jobs

    reports_dir = config.resolve({"reports_dir": reports_dir}, os.environ, config_file).reports_dir
    with jobs.lock(reports_dir, jobs.check_name(job)):
        n = jobs.forget(jobs.store_path(reports_dir), job, cards)
    what = f"{n} of the {len(cards)} cards given" if cards else f"all {n} confirmed pairs and its target"
    click.echo(f"job {job}: forgot {what}; its next run with --skip-confirmed sends those rows again")
    return 0


@main.command("revert", epilog=EXIT_CODES_HELP)
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--cluster", type=click.Choice(sorted(config.CLUSTERS), case_sensitive=False), help="Capillary cluster (default: the run's own target; another one is refused).")
@click.option("--base-url", help="API base URL (default: the run's own target; another one is refused).")
@click.option("--rate", help=f"Request rate cap, e.g. 1000/min (default {config.DEFAULT_RATE}).")
@click.option("--read-rate", help="Separate cap for reads (GET); default: reads share --rate.")
@click.option("--concurrency", type=int, help="Requests in flight at most (default 16).")
@click.option("--max-attempts", type=int, help="Attempts per request for transient errors (default 8).")
@click.option("--timeout", type=float, help="Seconds per request (default 30).")
@click.option("--outage-budget", type=float, help="Seconds the API may stay down before the revert aborts (default 300).")
@click.option("--grace-period", type=float, help="Seconds in-flight requests get after Ctrl-C/SIGTERM (default 10).")
@click.option("--allow-http", is_flag=True, default=None, help="Allow plain http:// to a non-loopback host.")
@click.option("--no-verify-tls", "no_verify_tls", is_flag=True, default=False, help="Turn TLS verification off (trusted test hosts only).")
@click.option("--progress", type=click.Choice(config.PROGRESS_MODES), help="auto (bar on a terminal, log lines otherwise), bar, lines, none.")
@click.option("--progress-interval", type=float, help="Seconds between progress lines when not on a terminal (default 10).")
@click.option("--dry-run", is_flag=True, default=None, help="Write RUN_DIR/revert.dry-run.csv (what would be set back, what cannot be); send nothing.")
@click.option("--retry-failed", is_flag=True, default=None, help="Send the rows whose revert failed again.")
@click.option("--json", "json_out", is_flag=True, default=False, help="Print the summary as JSON on stdout.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file (default ./capbatch.toml if present).")
@click.option("-q", "--quiet", is_flag=True, default=None, help="Only warnings, errors and the final summary line.")
@click.option("-v", "--verbose", count=True, help="More detail.")
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
        click.echo(json.dumps(summary, indent=2))
    return int(summary["exit_code"])


@main.command("status")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "json_out", is_flag=True, default=False)
@_guard
def status_cmd(run_dir: Path, json_out: bool) -> int:
    """Counts per state from RUN_DIR's ledger (safe while a run is in progress)."""
    st = runner.status(run_dir)
    if json_out:
        click.echo(json.dumps(st, indent=2))
        return 0
    click.echo(f"run directory: {st['run_dir']}  input: {st['input']}")
    total = sum(st["counts"].values())
    for state, n in st["counts"].items():
        click.echo(f"  {state:<10} {n:>10}  {100.0 * n / max(total, 1):5.1f}%")
    click.echo(f"  {'total':<10} {total:>10}")
    for inv in st["invocations"]:
        began = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(inv["started_at"]))
        click.echo(f"  invocation {inv['id']}: started {began}, outcome {inv['outcome'] or 'running/killed'}, "
                   f"exit {inv['exit_code'] if inv['exit_code'] is not None else '-'}, {inv['requests']} requests")
    return 0


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@_guard
def report_cmd(run_dir: Path) -> int:
    """Rebuild results.csv, failures.csv, summary.json and report.html from RUN_DIR's ledger."""
    setup_logging(False, 0)
    summary = runner.rebuild_reports(run_dir)
    click.echo(f"reports rebuilt in {run_dir}: {report.status_line(summary['counts'])}")
    return 0


@main.command("simulate")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--cards", type=click.Path(path_type=Path, exists=True), help="CSV of seeded cards (cardNumber[,cardExternalId]).")
@click.option("--auto-create", is_flag=True, help="Every card number exists.")
@click.option("--latency", type=float, default=0.0, show_default=True, help="Seconds added to each answer.")
@click.option("--jitter", type=float, default=0.0, show_default=True)
@click.option("--rate-per-minute", type=int, help="429 beyond this many requests in any 60 s.")
@click.option("--rate-per-second", type=int)
@click.option("--retry-after", type=float, help="Retry-After seconds sent with 429.")
@click.option("--p-500", type=float, default=0.0)
@click.option("--p-503", type=float, default=0.0)
@click.option("--p-drop", type=float, default=0.0)
@click.option("--p-hang", type=float, default=0.0)
@click.option("--p-429", type=float, default=0.0)
@click.option("--errors-status", type=int, default=400, show_default=True, help="HTTP status of business errors (200/201 mimic '2xx with errors', 500 the documented failure status).")
@click.option("--token-ttl", type=float, default=300.0, show_default=True)
@click.option("--down", type=click.Choice(["503", "502", "403", "drop", "hang"]), help="Start in an outage: every request answered so.")
@click.option("--business-errors", type=click.Choice(["coded", "generic"]), default="coded", show_default=True, help="generic: business errors carry only code 500 'All requests have failed due to errors'.")
@click.option("--fault-body", type=click.Choice(["json", "html"]), default="json", show_default=True, help="html: 5xx faults and --down 502/503/403 answer a CDN's HTML page.")
@click.option("--p-noop", type=float, default=0.0, help="Share of PUTs answered 200 without being applied.")
@click.option("--noop-echo", type=click.Choice(["request", "stored", "omit"]), default="request", show_default=True, help="What a no-op answer names as cardExternalId.")
@click.option("--p-echo-other", type=float, default=0.0, help="Share of applied PUTs whose answer names another ID (or card).")
@click.option("--echo-other", type=click.Choice(["cardExternalId", "cardNumber"]), default="cardExternalId", show_default=True)
@click.option("--put-identifies-by", type=click.Choice(["cardNumber", "cardExternalId"]), default="cardNumber", show_default=True, help="cardExternalId: the PUT finds the card by its external ID (older docs' reading).")
@click.option("--warning-code", type=int, help="PUT answers carry this warning, e.g. 3039.")
@click.option("--warning-message", default="No update in status label", show_default=True)
@click.option("--required-field", "required_fields", multiple=True, metavar="NAME", help="PUTs without this field get 403 'Mandatory field is missing' (repeatable), e.g. statusLabel.")
@_guard
def simulate_cmd(**opts: Any) -> int:
    """Run the built-in Capillary API simulator on loopback (demo credentials: demo/demo)."""
    from .simulator import SimConfig, load_cards_csv, serve

    cards_path = opts.pop("cards")
    host, port = opts.pop("host"), opts.pop("port")
    opts["required_fields"] = list(opts["required_fields"])
    cfg = SimConfig(cards=load_cards_csv(cards_path) if cards_path else {}, **opts)
    if not config.is_loopback(host):
        raise UsageError(f"the simulator only listens on loopback, not {host}", "use --host 127.0.0.1")
    serve(cfg, host, port)
    return 0


@main.command("demo")
@click.option("--input", "input_path", type=click.Path(path_type=Path), help="Sample to run (default samples/cards.csv).")
@click.option("--latency", type=float, default=0.02, show_default=True, help="Simulated API latency in seconds.")
@click.option("--rate", default="1200/min", show_default=True)
@click.option("--progress", type=click.Choice(config.PROGRESS_MODES), default="auto")
@_guard
def demo_cmd(input_path: Path | None, latency: float, rate: str, progress: str) -> int:
    """Run the whole job end to end against the built-in simulator: no credentials, no network."""
    from .demo import run_demo

    setup_logging(False, 0)
    return run_demo(input_path, latency, rate, progress)


@main.command("config")
@click.option("--config", "config_file", type=click.Path(path_type=Path))
@_guard
def config_cmd(config_file: Path | None) -> int:
    """Print the effective settings, where each came from, and the credentials (masked)."""
    settings = config.resolve({}, os.environ, config_file)
    public = settings.public_dict()
    for key, value in public.items():
        origin = settings.sources.get(key, "default")
        click.echo(f"{key:<22} {value!s:<40} ({origin})")
    click.echo(f"{'credentials':<22} {settings.credentials.describe()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
