"""What a run tells the outside world: the metrics file (parsed with prometheus_client's own parser),
the Pushgateway push and the chat webhook, each received by a real local HTTP server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from capbatch import notify
from conftest import make_cards, popen_cli, write_csv


class Recorder:
    """A local HTTP server that records every request; ``mode`` ok | fail | hang."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.requests: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append({"method": self.command, "path": self.path, "body": body,
                                          "content_type": self.headers.get("Content-Type")})
                if recorder.mode == "hang":
                    time.sleep(3)
                    return
                self.send_response(500 if recorder.mode == "fail" else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = do_PUT = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Any]:
    started: list[Recorder] = []

    def start(mode: str = "ok") -> Recorder:
        r = Recorder(mode)
        started.append(r)
        return r

    yield start
    for r in started:
        r.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def labelled(values: dict, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in values.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items())]
    assert len(matches) == 1, (name, labels, [k for k in values if k[0] == name])
    return matches[0]


def test_metrics_file_pushgateway_and_webhook_at_the_end(tmp_path, sim, run_cli, receiver):
    pairs = make_cards(8)
    s = sim(cards={c: None for c, _ in pairs[:7]})          # the 8th card does not exist: 3010, failed
    src = write_csv(tmp_path / "cards.csv", pairs, extra_rows=[["0001", "N/A"]])   # rejected, never sent
    hook, gateway = receiver(), receiver()
    prom = tmp_path / "textfile" / "capbatch.prom"
    prom.parent.mkdir()
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", tmp_path / "r",
                "--job", "nightly", "--metrics-file", prom, "--pushgateway", gateway.url, "--notify-url",
                hook.url + "/hooks/T000/B000/secretpath")
    assert p.returncode == 1, p.stderr

    values = samples(prom.read_text())
    lab = {"job": "nightly", "input": "cards.csv"}
    assert labelled(values, "capbatch_rows", state="succeeded", **lab) == 7
    assert labelled(values, "capbatch_rows", state="failed", **lab) == 1
    assert labelled(values, "capbatch_rows", state="rejected", **lab) == 1
    assert labelled(values, "capbatch_rows", state="pending", **lab) == 0
    stats = s.stats()
    # every request the simulator answered, by status class (the first read is the preflight)
    assert labelled(values, "capbatch_requests_total", status_class="2xx", **lab) == \
        sum(n for code, n in stats["by_status"].items() if str(code).startswith("2"))
    assert labelled(values, "capbatch_requests_total", status_class="4xx", **lab) == \
        sum(n for code, n in stats["by_status"].items() if str(code).startswith("4"))
    assert sum(v for (n, _), v in values.items() if n == "capbatch_requests_total") == stats["requests"]
    assert labelled(values, "capbatch_exit_code", **lab) == 1
    assert labelled(values, "capbatch_running", **lab) == 0
    assert labelled(values, "capbatch_retries_total", **lab) == 0
    assert labelled(values, "capbatch_throttled_responses_total", **lab) == 0
    assert abs(labelled(values, "capbatch_last_success_timestamp_seconds", **lab) - time.time()) < 30
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert labelled(values, "capbatch_duration_seconds", **lab) == summary["duration_seconds"]
    assert labelled(values, "capbatch_throughput_rows_per_second", **lab) == summary["throughput_rows_per_second"]
    assert not list(prom.parent.glob("*.prom.*"))        # the atomic write left no temporary file

    # the Pushgateway got the same figures, grouped by job (no job label of their own)
    assert [(r["method"], r["path"]) for r in gateway.requests] == [("PUT", "/metrics/job/nightly")]
    pushed = samples(gateway.requests[0]["body"].decode())
    assert labelled(pushed, "capbatch_rows", state="succeeded", input="cards.csv") == 7
    assert all("job" not in dict(ls) for _, ls in pushed)

    # the webhook: one short {"text": ...} with the counts, exit code and report path, and no secret
    assert len(hook.requests) == 1 and hook.requests[0]["path"] == "/hooks/T000/B000/secretpath"
    assert hook.requests[0]["content_type"] == "application/json"
    body = json.loads(hook.requests[0]["body"])
    assert list(body) == ["text"]
    text = body["text"]
    assert "capbatch job nightly (cards.csv)" in text and "7 succeeded" in text and "1 failed" in text
    assert "1 rejected" in text and "exit code 1" in text and str(tmp_path / "r" / "report.html") in text
    assert "secretpath" not in p.stderr and "secretpath" not in (tmp_path / "r" / "summary.json").read_text()
    assert "Authorization" not in text and "password" not in text.lower() and s.url not in text


def test_metrics_file_is_updated_while_running(tmp_path, sim):
    pairs = make_cards(40)   # 2 s at 20/s: about six snapshots 0.3 s apart
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    prom = tmp_path / "run.prom"
    proc = popen_cli("run", src, "--base-url", s.url, "--rate", "20/s", "--run-dir", tmp_path / "r",
                     "--metrics-file", prom, "--progress-interval", "0.3", cwd=tmp_path)
    seen_running: list[float] = []
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if prom.exists():
                v = samples(prom.read_text())
                if labelled(v, "capbatch_running") == 1:
                    seen_running.append(labelled(v, "capbatch_rows", state="succeeded"))
            time.sleep(0.2)
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    # several snapshots while running, growing, below the total; no exit code until the end
    assert len(set(seen_running)) >= 3 and 0 < max(seen_running) < 40, seen_running
    assert seen_running == sorted(seen_running)
    final = samples(prom.read_text())
    assert labelled(final, "capbatch_running") == 0 and labelled(final, "capbatch_exit_code") == 0
    assert labelled(final, "capbatch_rows", state="succeeded") == 40
    assert labelled(final, "capbatch_rows", state="failed") == 0
    assert {dict(ls)["job"] for _, ls in final} == {"capbatch"}     # no --job: the default job label


def test_failing_webhook_and_pushgateway_are_warnings_and_a_refused_input_is_announced(tmp_path, sim, run_cli,
                                                                                       receiver):
    pairs = make_cards(3)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    hook, gateway = receiver("fail"), receiver("fail")
    prom = tmp_path / "m.prom"
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", tmp_path / "r",
                "--metrics-file", prom, "--pushgateway", gateway.url, "--notify-url", hook.url)
    assert p.returncode == 0, p.stderr
    assert "notification to http://127.0.0.1/*** refused (HTTP 500)" in p.stderr
    assert "pushing metrics to the Pushgateway failed" in p.stderr
    assert len(hook.requests) == 1 and len(gateway.requests) == 1
    first_success = labelled(samples(prom.read_text()), "capbatch_last_success_timestamp_seconds")

    # the next night's input is refused (exit 2): metrics and webhook still say so; the last success stays
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    hook.mode = "ok"
    p = run_cli("run", bad, "--base-url", s.url, "--metrics-file", prom, "--notify-url", hook.url)
    assert p.returncode == 2, p.stderr
    values = samples(prom.read_text())
    assert labelled(values, "capbatch_exit_code", input="bad.csv") == 2
    assert labelled(values, "capbatch_last_success_timestamp_seconds") == first_success
    text = json.loads(hook.requests[-1]["body"])["text"]
    assert "refused" in text and "exit code 2" in text


def test_a_hanging_webhook_costs_only_its_timeout(receiver):
    hook = receiver("hang")
    began = time.monotonic()
    assert notify.send(hook.url, "hello", timeout=0.5) is False
    assert time.monotonic() - began < 2.5
    assert json.loads(hook.requests[0]["body"]) == {"text": "hello"}
    down = receiver()
    down.close()
    assert notify.send(down.url, "hello", timeout=0.5) is False

