"""One frozen settings object, its defaults, and where each value came from.

Precedence: command-line flags > environment (CAPBATCH_*) > TOML file > defaults.
Credentials come only from the environment, never from flags or files that land in a repo.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from .errors import ConfigError, UsageError
from .ledger.base import is_database_url, redact_password

log = logging.getLogger("capbatch.config")

CLUSTERS: dict[str, str] = {
    "india": "https://apac.api.capillarytech.com",
    "apac": "https://apac.api.capillarytech.com",
    "apac2": "https://apac2.api.capillarytech.com",
    "eu": "https://eu.api.capillarytech.com",
    "us": "https://us.api.capillarytech.com",
    "cn": "https://api.capillarytech.cn.com",
    # the *.intouch.capillarytech.com hosts the current API overview lists
    "intouch-apac": "https://apac.intouch.capillarytech.com",
    "intouch-eu": "https://eu.intouch.capillarytech.com",
    "intouch-ushc": "https://ushc.intouch.capillarytech.com",
    "intouch-sea": "https://sea.intouch.capillarytech.com",
}
CLUSTER_NAMES_HELP = ("india (= apac), apac2, eu, us, cn; intouch-apac, intouch-eu, intouch-ushc, "
                      "intouch-sea (the *.intouch.capillarytech.com hosts)")
PROTECTED_FIELDS = ("cardNumber", "cardExternalId")   # --extra-field never overrides these

DEFAULT_RATE = "100/min"  # the documented quota of demo and test clusters; real orgs set --rate
DEFAULT_CONFIG_FILE = "capbatch.toml"
MODES = ("backfill", "reconcile")
PROGRESS_MODES = ("auto", "bar", "lines", "none")
RESUME_CHECKS = ("read", "resend")
AUTH_KINDS = ("basic", "oauth")
# CAPBATCH_* variables that are not settings (the tests' seed); anything else unknown gets a warning
OTHER_ENV_NAMES = frozenset({"CAPBATCH_TEST_SEED"})

_PERIODS = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0,
}


@dataclass(frozen=True)
class Rate:
    """``requests`` per ``period`` seconds, e.g. 1000 per 60."""

    requests: float
    period: float

    @property
    def per_second(self) -> float:
        return self.requests / self.period

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h"}.get(self.period, f"{self.period:g}s")
        return f"{self.requests:g}/{unit}"


def parse_rate(text: str | None) -> Rate | None:
    """``'1000/min'``, ``'20/s'``, ``'5000/h'``; ``'none'`` or ``'unlimited'`` turns the cap off."""
    if text is None:
        return None
    raw = str(text).strip().lower().replace(" ", "")
    if raw in ("none", "unlimited", "off"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(?:/|per)(\d*\.?\d*)([a-z]+)", raw)
    if not m or m.group(3) not in _PERIODS:
        raise UsageError(
            f"--rate {text!r} is not a rate",
            "write it as requests per unit, e.g. 1000/min, 20/s or 5000/h ('unlimited' for no cap)",
        )
    count = float(m.group(1))
    multiple = float(m.group(2)) if m.group(2) else 1.0
    if count <= 0 or multiple <= 0:
        raise UsageError(f"--rate {text!r} must be positive", "e.g. --rate 1000/min")
    return Rate(count, multiple * _PERIODS[m.group(3)])


@dataclass(frozen=True)
class Credentials:
    """Basic (username + password) or OAuth (client key + secret). Never printed, never stored."""

    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    client_key: str | None = field(default=None, repr=False)
    client_secret: str | None = field(default=None, repr=False)
    chosen: str | None = None      # --auth basic|oauth: which pair to use when both are set

    @property
    def kind(self) -> str:
        """'basic', 'oauth', 'none', or 'both' (both pairs set and no --auth choice: refused)."""
        oauth = bool(self.client_key and self.client_secret)
        basic = bool(self.username and self.password)
        if self.chosen in AUTH_KINDS:
            return self.chosen if (oauth if self.chosen == "oauth" else basic) else "none"
        if oauth and basic:
            return "both"
        return "oauth" if oauth else "basic" if basic else "none"

    def describe(self) -> str:
        if self.kind == "oauth":
            return f"OAuth client key {mask(self.client_key)} (from CAPILLARY_CLIENT_KEY/SECRET)"
        if self.kind == "basic":
            return f"Basic auth as {self.username} (password from CAPILLARY_PASSWORD)"
        if self.kind == "both":
            return ("both Basic (CAPILLARY_USERNAME/PASSWORD) and OAuth (CAPILLARY_CLIENT_KEY/SECRET) are set: "
                    "refused until --auth basic|oauth chooses")
        if self.chosen:
            return f"none: --auth {self.chosen} chose a pair that is not set"
        return "none"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Credentials":
        return cls(
            username=env.get("CAPILLARY_USERNAME") or None,
            password=env.get("CAPILLARY_PASSWORD") or None,
            client_key=env.get("CAPILLARY_CLIENT_KEY") or None,
            client_secret=env.get("CAPILLARY_CLIENT_SECRET") or None,
        )


def mask(secret: str | None) -> str:
    if not secret:
        return "(unset)"
    return secret[:2] + "***" if len(secret) > 6 else "***"


@dataclass(frozen=True)
class Settings:
    """Everything a run needs. Build it with :func:`resolve`; the CLI and the library API share it."""

    input: Path | None = None
    base_url: str | None = None
    cluster: str | None = None
    run_dir: Path | None = None
    reports_dir: Path = Path("reports")
    # input
    card_column: str | None = None
    external_id_column: str | None = None
    delimiter: str | None = None
    encoding: str | None = None
    sheet: str | int | None = None
    header_row: int = 1
    # rules
    external_id_length: int | None = None
    external_id_min_length: int | str | None = None  # a number, or "card" (the row's card length)
    external_id_pattern: str | None = None
    strip_invisible: bool = False
    # sending
    mode: str = "backfill"
    rate: Rate | None = field(default_factory=lambda: parse_rate(DEFAULT_RATE))
    read_rate: Rate | None = None
    concurrency: int = 16
    max_attempts: int = 8
    timeout: float = 30.0
    resume_check: str = "read"
    generate_missing: bool = False
    skip_confirmed: bool = False
    job: str | None = None
    ledger: str | None = None          # a postgresql:// URL; None: the run directory's SQLite file
    audit_fraction: float | None = None   # with --skip-confirmed: share of confirmed pairs re-read per run
    retry_failed: bool = False            # send the rows that failed in this run again
    record_previous: bool = False         # backfill: read each card first to record the ID it held
    dry_run: bool = False
    check_remote: bool = False
    outage_budget: float = 300.0
    grace_period: float = 10.0
    # constant fields added to every PUT body (from code also a mapping; always stored as pairs)
    extra_fields: tuple[tuple[str, Any], ...] | Mapping[str, Any] = ()
    read_back: bool = False            # read every card after its PUT (answers not trusted alone)
    # proving the contract / stopping a doomed run
    canary: int | None = None          # rows proven one at a time first; None = 5 unless the target is loopback
    tripwire: bool = True
    tripwire_rate: float = 0.9
    tripwire_rows: int = 50
    # planning, time windows and the shared quota (capbatch.plan, capbatch.window, capbatch.quota)
    windows: tuple[str, ...] = ()
    timezone: str | None = None
    window_exit: bool = False
    deadline: str | None = None
    deadline_strict: bool = False
    quota_dir: Path | None = None
    priority: int = 1
    # safety
    allow_http: bool = False
    verify_tls: bool = True        # switched off only by the --no-verify-tls flag
    auth: str | None = None        # basic | oauth: which credentials when both pairs are set
    # telling the outside world
    metrics_file: Path | None = None
    pushgateway: str | None = None
    notify_url: str | None = None
    # output
    progress: str = "auto"
    progress_interval: float = 10.0
    quiet: bool = False
    verbose: int = 0
    credentials: Credentials = field(default_factory=Credentials, repr=False)
    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def public_dict(self) -> dict[str, Any]:
        """Settings as plain values, safe to write to summary.json and logs (no secrets)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("credentials", "sources"):
                continue
            value = getattr(self, f.name)
            if f.name in ("base_url", "pushgateway") and value:
                value = redact_url(value)
            if f.name == "ledger" and value:
                value = redact_password(value)
            if f.name == "notify_url" and value:
                value = redact_webhook(value)
            if f.name == "extra_fields":
                value = dict(value)   # type: ignore[arg-type]
            out[f.name] = str(value) if isinstance(value, (Path, Rate)) else value
        out["auth"] = self.credentials.kind
        return out


def redact_webhook(url: str) -> str:
    """A webhook URL's path is its secret (Slack, Teams): show only where it goes."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}/***"


def redact_url(url: str) -> str:
    """A URL as it may be printed: no user, password or query."""
    parts = urlsplit(url)
    if parts.username or parts.password or parts.query:
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://***@{host}{port}{parts.path}" + ("?***" if parts.query else "")
    return url


# Settings a TOML file or CAPBATCH_* variable may set, with their parser.
def _int(v: Any) -> int:
    return int(v)


def _float(v: Any) -> float:
    return float(v)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _str(v: Any) -> str:
    return str(v)


def _path(v: Any) -> Path:
    return Path(str(v))


def _windows(v: Any) -> tuple[str, ...]:
    items = v if isinstance(v, (list, tuple)) else str(v).split(",")
    return tuple(str(i).strip() for i in items if str(i).strip())


def _sheet(v: Any) -> str | int:
    s = str(v)
    return int(s) if s.isdigit() else s


def parse_extra_fields(value: Any) -> tuple[tuple[str, Any], ...]:
    """``NAME=VALUE`` (a string) or ``NAME:=JSON`` (a number, true/false, an object...), as flags give
    them (a tuple), as a TOML table or list, or as CAPBATCH_EXTRA_FIELDS (pairs separated by ';')."""
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    else:
        specs = value.split(";") if isinstance(value, str) else list(value)
        items = [_extra_field(str(spec)) for spec in specs if str(spec).strip()]
    names = [k for k, _ in items]
    for name in names:
        if not name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
            raise ValueError(f"extra field name {name!r} is not a field name")
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ValueError(f"extra field {', '.join(doubled)} given more than once")
    return tuple(items)


def _extra_field(spec: str) -> tuple[str, Any]:
    import json

    name, sep, raw = spec.partition(":=")
    if sep and "=" not in name:
        try:
            return name.strip(), json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{spec!r}: the value after := must be JSON ({exc})") from exc
    name, sep, raw = spec.partition("=")
    if not sep:
        raise ValueError(f"{spec!r} is not NAME=VALUE (or NAME:=JSON)")
    return name.strip(), raw


def _min_length(v: Any) -> int | str:
    s = str(v).strip()
    if s.casefold() == "card":
        return "card"
    return int(s)


SETTABLE: dict[str, Any] = {
    "base_url": _str, "cluster": _str, "run_dir": _path, "reports_dir": _path,
    "card_column": _str, "external_id_column": _str, "delimiter": _str, "encoding": _str,
    "sheet": _sheet, "header_row": _int,
    "external_id_length": _int, "external_id_pattern": _str, "strip_invisible": _bool,
    "external_id_min_length": _min_length,
    "mode": _str, "rate": parse_rate, "read_rate": parse_rate, "concurrency": _int,
    "max_attempts": _int, "timeout": _float, "resume_check": _str,
    "generate_missing": _bool, "skip_confirmed": _bool, "job": _str, "ledger": _str,
    "audit_fraction": _float, "record_previous": _bool,
    "outage_budget": _float, "grace_period": _float,
    "windows": _windows, "timezone": _str, "window_exit": _bool, "deadline": _str,
    "deadline_strict": _bool, "quota_dir": _path, "priority": _int,
    "allow_http": _bool, "auth": _str,
    "extra_fields": parse_extra_fields, "read_back": _bool, "canary": _int, "tripwire": _bool,
    "tripwire_rate": _float, "tripwire_rows": _int,
    "progress": _str, "progress_interval": _float,
    "metrics_file": _path, "pushgateway": _str, "notify_url": _str,
}
# Settings only a command-line flag may change, never a file or the environment (the README's promise).
FLAG_ONLY = {"verify_tls": "--no-verify-tls"}


def load_toml(path: Path | None) -> tuple[dict[str, Any], str | None]:
    """Read ``[capbatch]`` (or top-level keys) from a TOML file; ``None`` means ./capbatch.toml if present."""
    explicit = path is not None
    path = path or Path(DEFAULT_CONFIG_FILE)
    if not path.exists():
        if explicit:
            raise ConfigError(f"config file {path} does not exist", "check the --config path")
        return {}, None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", "fix the file or drop --config") from exc
    section = data.get("capbatch", data)
    for key, flag in FLAG_ONLY.items():
        if key in {k.replace("-", "_") for k in section}:
            raise ConfigError(f"config file {path} sets {key}: TLS verification can only be switched off on the "
                              f"command line, with {flag}", f"remove {key} from the file; pass {flag} "
                              "for a trusted test host")
    unknown = sorted(k for k in section if k.replace("-", "_") not in SETTABLE)
    if unknown:
        raise ConfigError(
            f"config file {path} has unknown settings: {', '.join(unknown)}",
            f"known settings: {', '.join(sorted(SETTABLE))}",
        )
    secretish = [k for k in section if any(w in k.lower() for w in ("password", "secret", "token"))]
    if secretish:
        raise ConfigError(f"config file {path} must not hold secrets ({', '.join(secretish)})",
                          "set CAPILLARY_* environment variables instead")
    return {k.replace("-", "_"): v for k, v in section.items()}, str(path)


def resolve(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge defaults < TOML < CAPBATCH_* environment < flags into one validated Settings.

    ``flags`` holds only the values the user actually gave (None means "not given").
    """
    env = os.environ if env is None else env
    file_values, file_name = load_toml(config_file)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def take(key: str, raw: Any, origin: str) -> None:
        parser = SETTABLE.get(key)
        try:
            values[key] = parser(raw) if parser and raw is not None else raw
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{origin}: {key} = {raw!r} is not valid ({exc})",
                              "fix the value; see `capbatch config` for the effective settings") from exc
        sources[key] = origin

    for key, raw in file_values.items():
        take(key, raw, f"file {file_name}")
    _check_env_names(env)
    for key in SETTABLE:
        name = "CAPBATCH_" + key.upper()
        if env.get(name) not in (None, ""):
            take(key, env[name], f"env {name}")
    for key, raw in flags.items():
        if raw is None or raw == () or key not in {f.name for f in dataclasses.fields(Settings)}:
            continue
        if key in SETTABLE and isinstance(raw, (str, tuple, list, Mapping)):
            take(key, raw, "flag")
        else:
            values[key] = raw
            sources[key] = "flag"

    _one_target(values, sources)
    values["credentials"] = dataclasses.replace(Credentials.from_env(env), chosen=values.get("auth"))
    values["sources"] = sources
    settings = Settings(**values)
    return validate(settings)


def _check_env_names(env: Mapping[str, str]) -> None:
    """CAPBATCH_VERIFY_TLS is refused (a flag-only setting); a misspelled CAPBATCH_* name is named."""
    for key, flag in FLAG_ONLY.items():
        name = "CAPBATCH_" + key.upper()
        if env.get(name) not in (None, ""):
            raise ConfigError(f"{name} is set: TLS verification can only be switched off on the command line, "
                              f"with {flag}", f"unset {name}; pass {flag} for a trusted test host")
    known = ["CAPBATCH_" + k.upper() for k in SETTABLE]
    for name in sorted(env):
        if not name.startswith("CAPBATCH_") or name in known or name in OTHER_ENV_NAMES:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        if close:
            log.warning("environment variable %s is not a capbatch setting and is ignored: did you mean %s?",
                        name, close[0])
        else:
            log.warning("environment variable %s is not a capbatch setting and is ignored (settings: %s)",
                        name, ", ".join(known))


_RANK = {"flag": 3, "env": 2, "file": 1}


def _one_target(values: dict[str, Any], sources: dict[str, str]) -> None:
    """--cluster and --base-url name the same thing: the one from the stronger source wins
    (a --cluster flag must beat a base_url from the TOML file); both as flags is a usage error."""
    if not values.get("cluster") or not values.get("base_url"):
        return
    rank = {k: _RANK[sources[k].split()[0]] for k in ("cluster", "base_url")}
    if rank["cluster"] == rank["base_url"]:
        raise UsageError(f"both cluster and base_url are set ({sources['cluster']}, {sources['base_url']})",
                         "give one of --cluster or --base-url")
    weaker = "cluster" if rank["cluster"] < rank["base_url"] else "base_url"
    values.pop(weaker)
    sources.pop(weaker)


def validate(s: Settings) -> Settings:
    if s.mode not in MODES:
        raise UsageError(f"--mode {s.mode!r} is unknown", f"use one of: {', '.join(MODES)}")
    if s.progress not in PROGRESS_MODES:
        raise UsageError(f"--progress {s.progress!r} is unknown", f"use one of: {', '.join(PROGRESS_MODES)}")
    if s.resume_check not in RESUME_CHECKS:
        raise UsageError(f"--resume-check {s.resume_check!r} is unknown", "use 'read' or 'resend'")
    if not 1 <= s.concurrency <= 1024:
        raise UsageError(f"--concurrency {s.concurrency} is out of range", "use a value from 1 to 1024")
    if s.max_attempts < 1:
        raise UsageError("--max-attempts must be at least 1", "e.g. --max-attempts 8")
    if s.header_row < 1:
        raise UsageError("--header-row counts from 1", "e.g. --header-row 3 when two title rows sit above the header")
    if s.external_id_length is not None and not 1 <= s.external_id_length <= 50:
        raise UsageError("--external-id-length must be 1..50", "external IDs are at most 50 characters")
    if s.ledger and not is_database_url(s.ledger):
        raise UsageError(f"--ledger {redact_password(s.ledger)} is not a database URL",
                         "give postgresql://USER@HOST:PORT/DATABASE, or leave --ledger out to keep the ledger "
                         "in the run directory")
    if s.external_id_min_length is not None and s.external_id_min_length != "card" and not (
            isinstance(s.external_id_min_length, int) and 1 <= s.external_id_min_length <= 50):
        raise UsageError("--external-id-min-length must be 1..50 or 'card'",
                         "external IDs are at most 50 characters; 'card' means at least as long as "
                         "each row's card number")
    if (s.external_id_length is not None and isinstance(s.external_id_min_length, int)
            and s.external_id_length < s.external_id_min_length):
        raise UsageError(f"--external-id-length {s.external_id_length} is below --external-id-min-length "
                         f"{s.external_id_min_length}", "give one of them, or make them agree")
    if s.auth is not None and s.auth not in AUTH_KINDS:
        raise UsageError(f"--auth {s.auth} is unknown", "use --auth basic or --auth oauth")
    if s.audit_fraction is not None and not 0 < s.audit_fraction <= 1:
        raise UsageError(f"--audit-fraction {s.audit_fraction:g} is out of range",
                         "give the share of confirmed pairs to re-read per run, above 0 and at most 1, "
                         "e.g. 0.05 (every pair re-read within 20 runs)")
    if not 1 <= s.priority <= 100:
        raise UsageError(f"--priority {s.priority} is out of range",
                         "use 1 (default) to 100: a run's share of a shared quota is proportional to it")
    from .window import parse_deadline, parse_timezone, parse_window

    for text in s.windows:
        parse_window(text)
    tz = parse_timezone(s.timezone)
    if s.deadline:
        parse_deadline(s.deadline, 0.0, tz)
    if s.cluster and s.cluster.lower() not in CLUSTERS:
        raise UsageError(f"--cluster {s.cluster!r} is unknown", f"use one of: {CLUSTER_NAMES_HELP}; or --base-url")
    protected = [n for n, _ in s.extra_fields if n.lower() in {p.lower() for p in PROTECTED_FIELDS}]
    if protected:
        raise UsageError(f"--extra-field {protected[0]} would override the row's own {protected[0]}",
                         "cardNumber and cardExternalId come from the input file; extra fields add others, "
                         "e.g. --extra-field statusLabel=Active")
    if s.canary is not None and not 0 <= s.canary <= 1000:
        raise UsageError(f"--canary {s.canary} is out of range", "rows to prove first: 0 (skip) to 1000, default 5")
    if not 0.0 < s.tripwire_rate <= 1.0:
        raise UsageError(f"--tripwire-rate {s.tripwire_rate:g} is out of range",
                         "a share of the first rows, above 0 and at most 1, e.g. 0.9")
    if s.tripwire_rows < 1:
        raise UsageError("--tripwire-rows must be at least 1", "e.g. --tripwire-rows 50 (or --no-tripwire)")
    return s


def target_url(s: Settings) -> str:
    """The API base URL: --base-url wins over --cluster. Refuses plain http to a non-loopback host."""
    if s.base_url:
        url = s.base_url.rstrip("/")
    elif s.cluster:
        url = CLUSTERS[s.cluster.lower()]
    else:
        raise UsageError("no API target given", f"pass --cluster NAME ({CLUSTER_NAMES_HELP}) or --base-url URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--base-url {url!r} is not an http(s) URL", "e.g. --base-url https://eu.api.capillarytech.com")
    if parts.username or parts.password or parts.query:
        raise UsageError("--base-url must not carry credentials or a query string (user:password@host, ?key=...)",
                         "give the bare API root, e.g. https://eu.api.capillarytech.com; credentials go in "
                         "CAPILLARY_USERNAME / CAPILLARY_PASSWORD")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not s.allow_http:
        raise UsageError(
            f"refusing plain http:// to {parts.hostname}: credentials would cross the network unencrypted",
            "use https://, or pass --allow-http if this really is a trusted network",
        )
    return url


DEFAULT_CANARY = 5


def canary_rows(s: Settings, base_url: str) -> int:
    """Rows the canary proves before the pool opens: --canary, else 5 — none against a loopback simulator."""
    if s.canary is not None:
        return s.canary
    return 0 if is_loopback(urlsplit(base_url).hostname or "") else DEFAULT_CANARY


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
