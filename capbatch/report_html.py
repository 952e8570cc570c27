"""report.html: one self-contained page a person opens in a browser after (or during) a run.

No external assets: inline CSS, inline SVG charts drawn here, no JavaScript. A Content-Security-Policy
meta tag forbids scripts and remote loads, and every value is escaped (cells come from user
spreadsheets). Every query is an aggregate or LIMITed, so a ledger of millions of rows renders in
about the time of a couple of index scans.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import __version__
from .ledger import Ledger, row_label
from .wording import abort_advice

REPORT_HTML = "report.html"
MAX_BINS = 120            # timeline bars at most
MAX_GROUPS = 40           # error codes / reasons listed at most
EXAMPLES = 3              # example rows per error code / reason

# Human descriptions of rejection reasons (rules.py / ledger.py codes); others fall back to the
# first example's own message.
REASON_TEXT = {
    "missing_card": "The card number is empty.",
    "missing_external_id": "The external ID is empty.",
    "placeholder": "A placeholder (N/A, null, -, ...) instead of a value.",
    "too_long": "Longer than the API's maximum of 50 characters.",
    "wrong_length": "Not the length this org requires (--external-id-length).",
    "pattern": "Does not match --external-id-pattern.",
    "invisible_chars": "Contains invisible or control characters (see --strip-invisible).",
    "scientific_notation": "Scientific notation: Excel lost the digits.",
    "float_rendering": "A number turned into a decimal (a trailing .0 was added).",
    "conflict_card": "The same card is given different external IDs in several rows.",
    "conflict_external_id": "The same external ID is given to different cards in several rows.",
    "formula_no_value": "An Excel formula without a computed value.",
    "excel_error": "An Excel error cell (#N/A, #REF!, ...).",
    "excel_date": "Excel stored a date, not the typed text.",
    "excel_bool": "Excel stored a logical value (TRUE/FALSE).",
    "excel_number": "Excel stored a number that cannot hold the exact digits.",
    "extra_cells": "The row has more cells than the header (an unquoted delimiter?).",
}

C_OK, C_FAIL, C_RETRY, C_429, C_BAR = "#2f855a", "#c53030", "#d69e2e", "#6b46c1", "#3b6ea8"
STATE_COLOURS = {"succeeded": C_OK, "unchanged": "#68a684", "duplicate": "#9ac5ab", "failed": C_FAIL,
                 "rejected": "#dd6b20", "in_flight": "#4a90c2", "pending": "#cbd5e0"}

_CSS = """
:root{--fg:#1a202c;--muted:#5a6472;--line:#dde2e8;--zebra:#f6f8fa;--bg:#fff;--card:#fbfcfd}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:16px;margin:32px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:14px;margin:18px 0 6px}
.sub{color:var(--muted);margin:0}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.pill{display:inline-block;padding:2px 10px;border-radius:999px;font-size:12.5px;font-weight:600;
 vertical-align:middle;margin-left:8px;color:#fff}
.p-ok{background:#2f855a}.p-warn{background:#b7791f}.p-bad{background:#c53030}.p-run{background:#3b6ea8}
.banner{margin:16px 0 0;padding:10px 14px;border-radius:6px;background:#ebf4ff;border:1px solid #bcd6f5}
.banner.warn{background:#fffaf0;border-color:#f6d9a8}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px;margin-top:18px}
.card{background:var(--card);border:1px solid var(--line);border-left:4px solid var(--line);border-radius:6px;
 padding:10px 12px}
.card .v{font-size:21px;font-weight:650;font-variant-numeric:tabular-nums;white-space:nowrap}
.card .l{color:var(--muted);font-size:12.5px}
.card .s{color:var(--muted);font-size:11.5px}
.card.good{border-left-color:#2f855a}.card.bad{border-left-color:#c53030}.card.warn{border-left-color:#dd6b20}
.card.info{border-left-color:#3b6ea8}
.states{display:flex;height:12px;border-radius:6px;overflow:hidden;margin:14px 0 6px;background:#edf2f7}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;color:var(--muted);font-size:12.5px;margin:4px 0}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12.5px;color:var(--muted);font-weight:600;background:#fff}
tbody tr:nth-child(even) td{background:var(--zebra)}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.wrap{overflow-wrap:anywhere}
table.kv td:first-child{width:220px;color:var(--muted)}
table.breakdown{table-layout:auto}
table.breakdown tbody.grp td{background:#fff}
table.breakdown tbody.grp{border-top:2px solid var(--line)}
table.breakdown td.code{font-weight:650;white-space:nowrap;width:1%}
table.breakdown>thead>tr>th.n,table.breakdown>tbody>tr>td.n{width:1%}
table.breakdown tr.examples td{border-bottom:none;padding-top:0}
.exlabel{color:var(--muted);font-size:11.5px;margin:0 0 2px}
table.ex{margin:0 0 6px;font-size:12.5px;border:1px solid var(--line);border-radius:4px}
table.ex th{background:var(--zebra)}
table.ex td,table.ex th{padding:3px 8px}
table.ex tbody tr:nth-child(even) td{background:var(--zebra)}
table.ex{table-layout:fixed}
table.ex .exrow{width:70px}table.ex .excard{width:28%}table.ex .exext{width:26%}
table.ex td.wrap{overflow-wrap:anywhere}
.chart{border:1px solid var(--line);border-radius:6px;padding:8px 8px 2px;background:#fff}
.chart svg{display:block;width:100%;height:auto}
.empty{color:var(--muted);font-style:italic;padding:8px 0}
.two{display:grid;grid-template-columns:1fr 1fr;gap:0 28px}
@media (max-width:900px){.two{grid-template-columns:1fr}}
footer{margin-top:36px;color:var(--muted);font-size:12px}
@media print{main{max-width:none;padding:0}.chart,.card{break-inside:avoid}}
"""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


# ---- small helpers ----------------------------------------------------------------------------
def e(value: Any) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return escape("" if value is None else str(value), quote=True)


def num(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return e(value)


def duration(seconds: Any) -> str:
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "—"
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"


def utc(ts: Any, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    if not ts:
        return "—"
    return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime(fmt)


def clip(value: Any, limit: int = 60) -> str:
    """Cell text cut to ``limit`` characters (a spreadsheet cell can hold 32k), before escaping."""
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def pct(part: int, total: int) -> str:
    return f"{100.0 * part / total:.1f}%" if total else ""


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(value: Any) -> Any:
    """Drop user:password@ from URLs shown in settings (defence in depth; settings hold no secrets)."""
    return _USERINFO.sub("***@", value) if isinstance(value, str) else value


def nice_step(maximum: float, ticks: int = 4) -> float:
    """A 1/2/5 x 10^k step giving about ``ticks`` intervals up to ``maximum``."""
    if maximum <= 0:
        return 1.0
    raw = maximum / ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag  # pragma: no cover


def fmt_tick(v: float) -> str:
    if v >= 10000:
        return f"{v / 1000:,.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k".replace(".0k", "k")
    return f"{v:g}" if v == int(v) else f"{v:.1f}"


def table(headers: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """headers: (label, css class); rows: already-escaped cell HTML."""
    head = "".join(f'<th class="{c}">{e(h)}</th>' for h, c in headers)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{cell}</td>' for (_, c), cell in zip(headers, r)) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ---- sections ---------------------------------------------------------------------------------
def _status(summary: dict[str, Any], invocations: list[dict[str, Any]]) -> tuple[str, str, str]:
    """(pill text, pill class, banner html)."""
    counts = summary.get("counts") or {}
    running = bool(invocations) and not invocations[-1].get("ended_at")
    unsettled = int(counts.get("pending", 0)) + int(counts.get("in_flight", 0))
    stop = summary.get("stop") or ""
    if running:
        return ("in progress", "p-run",
                '<p class="banner">A run is in progress (or its process stopped without finishing): this page is '
                f'a snapshot taken at {e(utc(time.time()))} UTC. Rebuild it with <code>capbatch report '
                f'{e(summary.get("run_dir", ""))}</code>.</p>')
    if not invocations:
        return ("not started", "p-run", '<p class="banner">No run has started on this ledger yet.</p>')
    if stop == "aborted":   # the canary, the tripwire, credentials, an outage: not the rows' fault
        reason = f"{e(summary['message'])}. " if summary.get("message") else ""
        advice = abort_advice({k: int(v) for k, v in counts.items()})
        return ("aborted", "p-warn", f'<p class="banner warn">{reason}{e(advice[:1].upper() + advice[1:])}.</p>')
    if stop == "interrupted" or unsettled:
        msg = f" ({e(summary['message'])})" if summary.get("message") else ""
        return (stop or "unfinished", "p-warn",
                f'<p class="banner warn">The run {e(stop or "stopped")}{msg} with {num(unsettled)} rows not settled. '
                'Rerun the same command to resume where it stopped.</p>')
    code = summary.get("exit_code")
    if code == 0:
        return ("all rows settled", "p-ok", "")
    return ("completed with failures", "p-bad",
            '<p class="banner warn">Some rows failed or were rejected: fix them in <code>failures.csv</code> and '
            'feed that file back to <code>capbatch run</code>.</p>')


def _headline(summary: dict[str, Any]) -> str:
    c = summary.get("counts") or {}
    total = int((summary.get("input") or {}).get("rows") or sum(int(v) for v in c.values()))
    pending = int(c.get("pending", 0)) + int(c.get("in_flight", 0))
    failed, rejected = int(c.get("failed", 0)), int(c.get("rejected", 0))
    tput = float(summary.get("throughput_rows_per_second") or 0.0)
    cards = [
        ("Rows", num(total), "in the input", "info"),
        ("Succeeded", num(c.get("succeeded", 0)), pct(int(c.get("succeeded", 0)), total), "good"),
        ("Unchanged", num(c.get("unchanged", 0)), "already carried the ID", ""),
        ("Duplicates", num(c.get("duplicate", 0)), "sent once with an earlier row", ""),
        ("Failed", num(failed), pct(failed, total), "bad" if failed else ""),
        ("Rejected", num(rejected), pct(rejected, total) or "invalid input", "warn" if rejected else ""),
        ("Pending", num(pending), "not settled yet" if pending else "", "warn" if pending else ""),
        ("Duration", e(duration(summary.get("duration_seconds"))),
         f"{num(summary.get('invocations', 0))} invocation{'' if summary.get('invocations', 0) == 1 else 's'}", ""),
        ("Throughput", f"{tput:,.0f}" if tput >= 100 else f"{tput:,.1f}", f"rows/s · {tput * 60:,.0f}/min", ""),
        ("Requests", num(summary.get("requests", 0)), "HTTP requests sent", ""),
        ("Retries", num(summary.get("retries", 0)), "transient errors retried", ""),
        ("429s", num(summary.get("throttled_responses", 0)), "rate-limited answers", ""),
        ("Exit code", "—" if summary.get("stop") == "in progress" or not summary.get("invocations")
         else e(summary.get("exit_code", "—")),
         e(summary.get("stop") or ""),
         "info" if summary.get("stop") == "in progress" else ("good" if summary.get("exit_code") == 0 else "bad")),
    ]
    audit = summary.get("audit")
    if audit:   # the job's rolling audit: confirmed pairs re-read in this run (also counted as unchanged/succeeded)
        cards.append(("Audit", num(int(audit["rows"]) - int(audit.get("pending", 0))),
                      f"confirmed pairs re-read · {num(audit.get('drift_fixed', 0))} drifted, put back"
                      + (f" · {num(audit['pending'])} to read" if audit.get("pending") else ""),
                      "warn" if audit.get("drift_fixed") or audit.get("failed") else ""))
    out = ['<div class="grid">']
    for label, value, sub, cls in cards:
        out.append(f'<div class="card {cls}"><div class="l">{e(label)}</div><div class="v">{value}</div>'
                   f'<div class="s">{e(sub) if sub else "&nbsp;"}</div></div>')
    out.append("</div>")
    # one bar showing how the rows are split among the states
    if total:
        out.append('<div class="states" role="img" aria-label="rows by state">')
        legend = []
        for state in ("succeeded", "unchanged", "duplicate", "failed", "rejected", "in_flight", "pending"):
            n = int(c.get(state, 0))
            if n:
                out.append(f'<div title="{e(state)}: {n:,}" style="width:{100.0 * n / total:.4f}%;'
                           f'background:{STATE_COLOURS[state]}"></div>')
                legend.append(f'<span><span class="sw" style="background:{STATE_COLOURS[state]}"></span>'
                              f'{e(state.replace("_", " "))} {n:,}</span>')
        out.append("</div>")
        out.append('<div class="legend">' + "".join(legend) + "</div>")
    return "".join(out)


def _input_section(ledger: Ledger, summary: dict[str, Any], run_dir: Path) -> str:
    inp = summary.get("input") or {}
    mapping = inp.get("mapping") or {}
    rows = [
        ("Input file", e(inp.get("name") or "—")),
        ("SHA-256", f'<span class="mono">{e(inp.get("sha256") or "—")}</span>'),
        ("Columns", e(", ".join(str(c) for c in inp.get("columns") or []) or "—")),
        ("Card number column", e(mapping.get("cardNumber") or "—")),
        ("External ID column", e(mapping.get("cardExternalId") or "—")),
        ("Run directory", f'<span class="mono">{e(summary.get("run_dir") or run_dir)}</span>'),
        ("Started (UTC)", e(summary.get("started_at") or "—")),
        ("Ended (UTC)", e(summary.get("ended_at") or "—")),
    ]
    lat = summary.get("latency_ms") or {}
    if lat:
        rows.append(("Latency (ms)", e("  ·  ".join(f"{k} {v:g}" for k, v in lat.items()))))
    if summary.get("message"):
        rows.append(("Message", e(summary["message"])))
    body = "".join(f"<tr><td>{k}</td><td class=\"wrap\">{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _y_axis(parts: list[str], top: float, step: float, y: Any, L: float, right: float, label: str) -> None:
    v = 0.0
    while v <= top + 1e-9:
        parts.append(f'<line x1="{L}" x2="{right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e2e8f0"/>')
        parts.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#5a6472">{e(fmt_tick(v))}</text>')
        v += step
    mid = (y(0) + y(top)) / 2
    parts.append(f'<text x="12" y="{mid:.1f}" transform="rotate(-90 12 {mid:.1f})" text-anchor="middle" '
                 f'fill="#5a6472">{e(label)}</text>')


def _scale(peak: float) -> tuple[float, float]:
    step = nice_step(peak or 1.0)
    return step * max(1, math.ceil((peak or 1.0) / step)), step


def _timeline(ledger: Ledger) -> str:
    first, last = ledger.timeline_span()
    if first is None:
        return '<p class="empty">No requests have been recorded yet.</p>'
    first, last = int(first), int(last)
    span = last - first + 1
    width = max(1, math.ceil(span / MAX_BINS))
    nbins = math.ceil(span / width)
    bins = [[0, 0, 0, 0] for _ in range(nbins)]
    for b, ok, failed, retried, throttled in ledger.timeline_bins(first, width):
        if 0 <= int(b) < nbins:
            bins[int(b)] = [int(ok or 0), int(failed or 0), int(retried or 0), int(throttled or 0)]
    rates = [[v / width for v in row] for row in bins]

    # Two panels on one time axis: throughput (rows settled, ok + failed stacked) on top, and the
    # error rates (failed rows, retries, 429s) below on their own scale, so a 1% error rate shows.
    W, L, R = 1000, 56, 12
    T1, H1, GAP, H2, B = 12, 170, 26, 90, 42
    T2 = T1 + H1 + GAP
    H = T2 + H2 + B
    pw = W - L - R
    bw = pw / nbins
    top1, step1 = _scale(max(r[0] + r[1] for r in rates))
    top2, step2 = _scale(max(max(r[1], r[2], r[3]) for r in rates))

    def y1(v: float) -> float:
        return T1 + H1 - (v / top1) * H1

    def y2(v: float) -> float:
        return T2 + H2 - (v / top2) * H2

    def cx(i: int) -> float:
        return L + (i + 0.5) * bw

    parts = [f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="throughput and errors over time" '
             f'font-family="system-ui,sans-serif" font-size="11">']
    _y_axis(parts, top1, step1, y1, L, W - R, "rows / s")
    _y_axis(parts, top2, step2, y2, L, W - R, "errors / s")
    gap = 0.15 * bw if bw > 4 else 0.0
    bar = min(bw - gap, 60.0)            # a short run has few bins: keep bars slim, centred in their bin
    for i, (ok, failed, _retried, _throttled) in enumerate(rates):
        x = L + i * bw + (bw - bar) / 2
        start = first + i * width
        tip = (f"{utc(start, '%H:%M:%S')}{'' if width == 1 else '–' + utc(start + width - 1, '%H:%M:%S')} UTC: "
               f"{bins[i][0]:,} ok, {bins[i][1]:,} failed, {bins[i][2]:,} retries, {bins[i][3]:,} 429s")
        parts.append(f"<g><title>{e(tip)}</title>")
        if ok:
            parts.append(f'<rect x="{x:.2f}" y="{y1(ok):.2f}" width="{bar:.2f}" height="{y1(0) - y1(ok):.2f}" '
                         f'fill="{C_OK}"/>')
        if failed:
            parts.append(f'<rect x="{x:.2f}" y="{y1(ok + failed):.2f}" width="{bar:.2f}" '
                         f'height="{y1(ok) - y1(ok + failed):.2f}" fill="{C_FAIL}"/>')
        # a transparent hover target over both panels
        parts.append(f'<rect x="{L + i * bw:.2f}" y="{T1}" width="{bw:.2f}" height="{T2 + H2 - T1}" '
                     f'fill="transparent"/></g>')
    # lower panel: one line per error kind
    drawn = 0
    for idx, colour, dash in ((1, C_FAIL, ""), (2, C_RETRY, ""), (3, C_429, ' stroke-dasharray="5 3"')):
        if not any(r[idx] for r in rates):
            continue
        drawn += 1
        if nbins > 1:
            pts = " ".join(f"{cx(i):.1f},{y2(r[idx]):.1f}" for i, r in enumerate(rates))
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        if nbins <= 40:
            parts.extend(f'<circle cx="{cx(i):.1f}" cy="{y2(r[idx]):.1f}" r="3.5" fill="{colour}" '
                         f'stroke="#fff" stroke-width="1.5"/>' for i, r in enumerate(rates) if r[idx])
    if not drawn:
        parts.append(f'<text x="{L + pw / 2:.1f}" y="{y2(top2 / 2) + 4:.1f}" text-anchor="middle" '
                     f'fill="#5a6472">no failed rows, retries or 429s</text>')
    # axes
    for y0 in (y1(0), y2(0)):
        parts.append(f'<line x1="{L}" x2="{W - R}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#718096"/>')
    fmt = "%H:%M:%S" if span < 86400 else "%m-%d %H:%M"
    labels = min(6, nbins)
    for k in range(labels):
        i = 0 if labels == 1 else round(k * (nbins - 1) / (labels - 1))
        x = cx(i)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y2(0):.1f}" y2="{y2(0) + 4:.1f}" stroke="#718096"/>')
        anchor = "middle" if labels == 1 or 0 < k < labels - 1 else ("start" if k == 0 else "end")
        tx = x if anchor == "middle" else (max(x - 20, L) if k == 0 else min(x + 20, W - R))
        parts.append(f'<text x="{tx:.1f}" y="{y2(0) + 17:.1f}" text-anchor="{anchor}" fill="#5a6472">'
                     f'{e(utc(first + i * width, fmt))}</text>')
    parts.append(f'<text x="{L + pw / 2:.1f}" y="{H - 4}" text-anchor="middle" fill="#5a6472">time (UTC), '
                 f'{width}-second bins</text>')
    parts.append("</svg>")
    legend = ('<div class="legend">'
              f'<span><span class="sw" style="background:{C_OK}"></span>rows settled ok</span>'
              f'<span><span class="sw" style="background:{C_FAIL}"></span>rows failed</span>'
              f'<span><span class="sw" style="background:{C_RETRY}"></span>retries</span>'
              f'<span><span class="sw" style="background:{C_429}"></span>429 answers</span>'
              f'<span>{e(utc(first))} → {e(utc(last + 1))} UTC ({e(duration(span))} wall clock)</span></div>')
    return legend + f'<div class="chart">{"".join(parts)}</div>'


# Histogram edges in ms: 1-2-5 per decade.
_EDGES = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


def _ms(v: float) -> str:
    return f"{v / 1000:g} s" if v >= 1000 else f"{v:g} ms"


def _range(lo: float, hi: float) -> str:
    a, b = _ms(lo), _ms(hi)
    if a.split()[1] == b.split()[1]:
        return f"{a.split()[0]}–{b}"
    return f"{a}–{b}"


def latency_histogram(ledger: Ledger) -> list[tuple[int, int]]:
    """(bucket_ms, count) with 1 ms buckets below 100 ms, 10 ms up to 1 s, 100 ms above."""
    return ledger.latency_histogram()


def _latency(ledger: Ledger, summary: dict[str, Any], hist: list[tuple[int, int]] | None = None) -> str:
    if hist is None:
        hist = latency_histogram(ledger)
    if not hist:
        return '<p class="empty">No request latencies have been recorded yet.</p>'
    counts = [0] * len(_EDGES)   # last bucket: >= the last edge
    for bucket, n in hist:
        i = len(_EDGES) - 1
        for j in range(len(_EDGES) - 1):
            if bucket < _EDGES[j + 1]:
                i = j
                break
        counts[i] += n
    lo = next(i for i, n in enumerate(counts) if n)
    hi = max(i for i, n in enumerate(counts) if n)
    lo, hi = max(0, lo - 1), min(len(counts) - 1, hi + 1)
    shown = list(range(lo, hi + 1))
    total = sum(counts)
    peak = max(counts) or 1
    step = nice_step(peak)
    top = step * math.ceil(peak / step)
    W, H, L, R, T, B = 1000, 240, 56, 12, 16, 42
    pw, ph = W - L - R, H - T - B
    bw = pw / len(shown)

    def y(v: float) -> float:
        return T + ph - (v / top) * ph

    parts = [f'<svg viewBox="0 0 {W} {H}" role="img" '
             f'aria-label="latency histogram" font-family="system-ui,sans-serif" font-size="11">']
    v = 0.0
    while v <= top + 1e-9:
        parts.append(f'<line x1="{L}" x2="{W - R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e2e8f0"/>')
        parts.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#5a6472">{e(fmt_tick(v))}</text>')
        v += step
    parts.append(f'<text x="12" y="{T + ph / 2:.1f}" transform="rotate(-90 12 {T + ph / 2:.1f})" '
                 f'text-anchor="middle" fill="#5a6472">requests</text>')
    for k, i in enumerate(shown):
        n = counts[i]
        label = f"≥ {_ms(_EDGES[i])}" if i == len(_EDGES) - 1 else _range(_EDGES[i], _EDGES[i + 1])
        x = L + k * bw
        parts.append(f"<g><title>{e(label)}: {n:,} rows ({pct(n, total)})</title>")
        parts.append(f'<rect x="{x + bw * 0.1:.1f}" y="{y(n):.1f}" width="{bw * 0.8:.1f}" height="{y(0) - y(n):.1f}" '
                     f'fill="{C_BAR}"/>')
        if n:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{y(n) - 4:.1f}" text-anchor="middle" fill="#1a202c">'
                         f'{n:,}</text>')
        parts.append(f'<text x="{x + bw / 2:.1f}" y="{y(0) + 16:.1f}" text-anchor="middle" fill="#5a6472">'
                     f'{e(label)}</text></g>')
    parts.append(f'<line x1="{L}" x2="{W - R}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#718096"/>')
    parts.append(f'<text x="{L + pw / 2:.1f}" y="{H - 4}" text-anchor="middle" fill="#5a6472">'
                 f'latency of the settling request (1-2-5 buckets)</text></svg>')
    lat = summary.get("latency_ms") or {}
    note = " · ".join(f"{e(k)} ≈ {e(_ms(float(v)))}" for k, v in lat.items())
    legend = f'<div class="legend"><span>{num(total)} rows with a latency</span>' + (
        f"<span>{note}</span>" if note else "") + "</div>"
    return legend + f'<div class="chart">{"".join(parts)}</div>'


def _breakdown(ledger: Ledger, state: str, column: str, message_column: str, total: int) -> str:
    groups = ledger.group_counts(state, column, MAX_GROUPS + 1)
    if not groups:
        return f'<p class="empty">No {e(state)} rows.</p>'
    more = len(groups) > MAX_GROUPS
    head: list[str] = []
    for code, n in groups[:MAX_GROUPS]:
        examples = ledger.group_examples(state, column, message_column, code, EXAMPLES)
        first_message = next((ex[4] for ex in examples if ex[4]), "")
        if state == "rejected":
            message = REASON_TEXT.get(str(code), first_message)
        else:
            statuses = sorted({ex[5] for ex in examples if ex[5]})
            message = first_message + (f" (HTTP {', '.join(map(str, statuses))})" if statuses else "")
        ex_rows = [(e(row_label(sheet, number)), f'<span class="mono">{e(clip(card))}</span>',
                    f'<span class="mono">{e(clip(ext))}</span>', e(clip(msg, 400)))
                   for sheet, number, card, ext, msg, _ in examples]
        ex_html = table([("Row", "n exrow"), ("Card", "wrap excard"), ("External ID", "wrap exext"),
                         ("Message", "exmsg")], ex_rows, "ex")
        head.append(f'<tbody class="grp"><tr><td class="code">{e(code)}</td><td class="n">{num(n)}</td>'
                    f'<td class="n">{e(pct(n, total))}</td><td>{e(clip(message, 400))}</td></tr>'
                    f'<tr class="examples"><td></td><td colspan="3"><div class="exlabel">first {len(examples)} '
                    f'example row{"s" if len(examples) != 1 else ""}</div>{ex_html}</td></tr></tbody>')
    out = ('<table class="breakdown"><thead><tr><th>Code</th><th class="n">Rows</th><th class="n">Share</th>'
           f'<th>Message</th></tr></thead>{"".join(head)}</table>')
    if more:
        out += f'<p class="sub">Only the {MAX_GROUPS} most frequent codes are listed; see failures.csv for all.</p>'
    return out


def _invocations(invocations: list[dict[str, Any]]) -> str:
    if not invocations:
        return '<p class="empty">No invocations yet.</p>'
    rows = []
    for inv in invocations:
        end = inv.get("ended_at")
        took = inv["duration"]   # a killed invocation: up to its last commit
        rows.append((num(inv.get("id")), e(inv.get("pid") or "—"), e(utc(inv.get("started_at"))), e(utc(end)),
                     e(duration(took)), e(inv.get("outcome") or ("running or killed" if not end else "")),
                     e("—" if inv.get("exit_code") is None else inv["exit_code"]), num(inv.get("requests") or 0)))
    return table([("#", "n"), ("PID", "n"), ("Started (UTC)", ""), ("Ended (UTC)", ""), ("Duration", "n"),
                  ("Outcome", ""), ("Exit code", "n"), ("Requests", "n")], rows)


def _plan(summary: dict[str, Any]) -> str:
    """Plan (stated before the last invocation's first request) against what that invocation did."""
    plan, done = summary.get("plan"), summary.get("actual")
    if not plan:
        return '<p class="empty">No plan recorded (runs before capbatch stated plans).</p>'
    done = done or {}

    def rate(v: Any) -> str:
        return "—" if v is None else f"{float(v):,.2f}/s · {float(v) * 60:,.0f}/min"

    rows = [
        ("Rows", num(plan.get("rows_to_send")), num(done.get("rows_settled")) if done else "—"),
        ("Requests", num(plan.get("requests_expected")), num(done.get("requests")) if done else "—"),
        ("Rate", e(rate(plan.get("rate_per_second"))), e(rate(done.get("rate_per_second")) if done else "—")),
        ("Time", e(duration(plan.get("eta_seconds"))), e(duration(done.get("seconds")) if done else "—")),
        ("Waiting for a window", "", e(duration(done.get("waiting_for_window_seconds"))) if done else "—"),
    ]
    note = f'<p class="sub">Windows: {e(plan.get("windows") or "any time")}'
    if plan.get("deadline_text"):
        note += f' · deadline {e(plan["deadline_text"])}: {"met" if plan.get("deadline_met") else "not met by the plan"}'
    note += "</p>"
    return table([("", ""), ("Plan", "n"), ("Actual", "n")], rows) + note


def _settings(summary: dict[str, Any]) -> str:
    settings = summary.get("settings") or {}
    if not settings:
        return '<p class="empty">No settings recorded (the run has not started).</p>'
    items = list(settings.items())
    half = (len(items) + 1) // 2

    def render(chunk: list[tuple[str, Any]]) -> str:
        rows = []
        for k, v in chunk:
            v = redact(v)
            shown = "—" if v is None else (json.dumps(v, default=str) if isinstance(v, (dict, list, bool)) else v)
            rows.append((f'<span class="mono">{e(k)}</span>', f'<span class="mono">{e(shown)}</span>'))
        return table([("Setting", ""), ("Value", "wrap")], rows, "kv")

    return f'<div class="two"><div>{render(items[:half])}</div><div>{render(items[half:])}</div></div>'


def _warnings(summary: dict[str, Any], total: int) -> str:
    """Warnings the API's answers carried (e.g. 3039 "No update in status label"), by code."""
    by_code = summary.get("warnings_by_code") or {}
    rows = [(f'<span class="code">{e(code or "?")}</span>', num(w.get("rows", 0)), e(pct(int(w.get("rows", 0)), total)),
             e(clip(w.get("message", ""), 400))) for code, w in by_code.items()]
    return table([("Code", ""), ("Rows", "n"), ("Share", "n"), ("Message", "")], rows, "breakdown")


# ---- the page ---------------------------------------------------------------------------------
def render(ledger: Ledger, run_dir: Path, summary: dict[str, Any],
           latency_buckets: list[tuple[int, int]] | None = None) -> str:
    """The page; ``latency_buckets``: the latency histogram when the caller has it (else read here)."""
    invocations = ledger.invocations()
    counts = summary.get("counts") or {}
    total = int(sum(int(v) for v in counts.values()))
    name = (summary.get("input") or {}).get("name") or "(no input yet)"
    pill, pill_cls, banner = _status(summary, invocations)
    failed_n, rejected_n = int(counts.get("failed", 0)), int(counts.get("rejected", 0))
    sections = [
        f'<header><h1>capbatch run report: {e(name)}<span class="pill {pill_cls}">{e(pill)}</span></h1>'
        f'<p class="sub">Run directory <span class="mono">{e(summary.get("run_dir") or run_dir)}</span> · '
        f'generated {e(utc(time.time()))} UTC by capbatch {e(__version__)}</p>{banner}</header>',
        f'<section id="headline">{_headline(summary)}</section>',
        f'<section id="input"><h2>Input</h2>{_input_section(ledger, summary, run_dir)}</section>',
        f'<section id="timeline"><h2>Throughput and errors over time</h2>{_timeline(ledger)}</section>',
        f'<section id="latency"><h2>Latency</h2>{_latency(ledger, summary, latency_buckets)}</section>',
        f'<section id="failed"><h2>Failed rows by error code ({num(failed_n)})</h2>'
        f'{_breakdown(ledger, "failed", "error_code", "error_message", total)}</section>',
        f'<section id="rejected"><h2>Rejected rows by reason ({num(rejected_n)})</h2>'
        f'{_breakdown(ledger, "rejected", "reason_code", "reason", total)}</section>',
        *([f'<section id="warnings"><h2>Warnings in the API\'s answers '
           f'({num(summary.get("rows_with_warnings", 0))} rows)</h2>{_warnings(summary, total)}</section>']
          if summary.get("warnings_by_code") else []),
        f'<section id="plan"><h2>Plan and actual (last invocation)</h2>{_plan(summary)}</section>',
        f'<section id="invocations"><h2>Invocations</h2>{_invocations(invocations)}</section>',
        f'<section id="settings"><h2>Settings</h2>{_settings(summary)}</section>',
        '<footer>Every number here comes from the run\'s ledger (ledger.sqlite). Row-level detail: results.csv; '
        'rows to fix and feed back: failures.csv; machine-readable totals: summary.json. '
        'Rebuild this page at any time with <code>capbatch report RUN_DIR</code>.</footer>',
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>capbatch report: {e(name)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(sections)}</main></body></html>\n")


def write_html(ledger: Ledger, run_dir: Path, summary: dict[str, Any],
               latency_buckets: list[tuple[int, int]] | None = None) -> Path:
    """Write run_dir/report.html atomically (temporary file + os.replace). Returns its path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_HTML
    text = render(ledger, run_dir, summary, latency_buckets)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path
