"""What an operator sees: output off a terminal, quiet mode, exit codes, the library API."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from conftest import REPO, cli_env, ledger_query, make_cards, popen_cli, write_csv


def test_not_on_a_terminal_progress_is_periodic_lines_without_a_bar(tmp_path, sim, run_cli):
    pairs = make_cards(60)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    p = run_cli("run", src, "--base-url", s.url, "--rate", "30/s", "--progress-interval", "0.5",
                "--run-dir", tmp_path / "r")
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "it/s" not in p.stderr           # no tqdm bar
    lines = [ln for ln in p.stderr.splitlines() if " progress " in ln]
    assert len(lines) >= 2 and "eta" in lines[0]
    assert p.stdout == ""                                            # stdout stays clean for --json


def test_quiet_prints_only_the_problems(tmp_path, sim, run_cli):
    pairs = make_cards(5)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs, extra_rows=[["0001", "N/A"]])
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "-q", "--run-dir", tmp_path / "r")
    assert p.returncode == 1
    assert "progress" not in p.stderr and "columns:" not in p.stderr
    assert "placeholder" in p.stderr            # the rejected row is still named


def test_json_summary_on_stdout(tmp_path, sim, run_cli):
    pairs = make_cards(3)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--json", "-q", "--run-dir", tmp_path / "r")
    assert p.returncode == 0
    summary = json.loads(p.stdout)
    assert summary["counts"]["succeeded"] == 3 and summary["exit_code"] == 0


@pytest.mark.parametrize("case,expected", [("ok", 0), ("row_failed", 1), ("bad_file", 2), ("auth", 3)])
def test_exit_codes(tmp_path, sim, run_cli, case, expected):
    pairs = make_cards(4)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs + ([("0404", "NOPE")] if case == "row_failed" else []))
    if case == "bad_file":
        src.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    env = cli_env(CAPILLARY_PASSWORD="wrong") if case == "auth" else None
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", tmp_path / "r", env=env)
    assert p.returncode == expected, p.stderr
    assert "Traceback" not in p.stderr


def test_validate_command_exit_codes_and_csv(tmp_path, run_cli):
    good = write_csv(tmp_path / "good.csv", make_cards(3))
    p = run_cli("validate", good)
    assert p.returncode == 0, p.stderr
    bad = write_csv(tmp_path / "bad.csv", make_cards(3), extra_rows=[["0009", ""], ["12345.0", "E"]])
    p = run_cli("validate", bad, "-o", tmp_path / "v.csv", "--json")
    assert p.returncode == 1
    result = json.loads(p.stdout)
    assert result["rejected"] == 2 and result["valid"] == 3
    text = (tmp_path / "v.csv").read_text(encoding="utf-8-sig")
    assert text.splitlines()[0] == "sheet,row,column,value,reason_code,reason"
    assert ",5,cardExternalId,," in text and ",6,cardNumber,12345.0," in text
    missing = run_cli("validate", tmp_path / "nope.csv")
    assert missing.returncode == 2


def test_library_api_returns_the_summary_and_raises_the_cli_errors(tmp_path, sim, monkeypatch):
    import capbatch

    pairs = make_cards(6)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    env = {"CAPILLARY_USERNAME": "demo", "CAPILLARY_PASSWORD": "demo"}
    summary = capbatch.run_backfill(str(src), base_url=s.url, rate="unlimited", run_dir=str(tmp_path / "r"),
                                    progress="none", env=env)
    assert summary["exit_code"] == 0 and summary["counts"]["succeeded"] == 6
    assert s.card_ids() == dict(pairs)
    with pytest.raises(capbatch.InputFileError):
        capbatch.run_backfill(str(tmp_path / "missing.csv"), base_url=s.url, env=env)
    with pytest.raises(capbatch.RunAborted):
        capbatch.run_backfill(str(src), base_url=s.url, rate="unlimited", run_dir=str(tmp_path / "r2"),
                              progress="none", env={"CAPILLARY_USERNAME": "demo", "CAPILLARY_PASSWORD": "bad"})
    v = capbatch.validate_file(str(src), reports_dir=str(tmp_path / "rep"))
    assert v["valid"] == 6 and v["exit_code"] == 0


# ---- a CLI that tells the scheduler the truth -----------------------------------------------------


def test_quiet_prints_the_final_summary_line_and_verbose_adds_debug_lines(tmp_path, sim, run_cli):
    pairs = make_cards(4)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    q = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "-q", "--run-dir", tmp_path / "q")
    assert q.returncode == 0, q.stderr
    lines = q.stderr.strip().splitlines()
    assert len(lines) == 1 and "done: 4 succeeded, 0 unchanged, 0 failed, 0 rejected, 0 duplicates, 0 pending" \
        in lines[0] and "4 requests" in lines[0], q.stderr
    v = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "-v", "--run-dir", tmp_path / "v")
    assert v.returncode == 0
    assert " DEBUG setting rate = - (flag)" in v.stderr                    # 'unlimited' is no cap: never 'None'
    assert " DEBUG setting concurrency = 16 (default)" in v.stderr
    assert " DEBUG setting base_url = " + s.url + " (flag)" in v.stderr
    assert "DEBUG" not in q.stderr and "setting " not in q.stderr


def _crashing(tmp_path: Path, command: str, target: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with one library function replaced by a bug (the only way to make one on purpose)."""
    code = (f"import sys, capbatch.runner as r; r.{target} = lambda *a, **k: 1 / 0; "
            f"from capbatch.cli import main; sys.argv = ['capbatch'] + sys.argv[1:]; main()")
    return subprocess.run([sys.executable, "-c", code, *command.split()], cwd=tmp_path,
                          env=dict(cli_env(), TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=60)


def test_internal_error_outside_a_run_is_exit_70_naming_the_traceback_file(tmp_path):
    p = _crashing(tmp_path, "status somewhere", "status")
    assert p.returncode == 70, p.stderr
    assert "internal error (ZeroDivisionError: division by zero)" in p.stderr and "bug in capbatch" in p.stderr
    assert "resume" not in p.stderr and "Traceback" not in p.stderr
    logs = list(tmp_path.glob("capbatch-internal-error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in p.stderr
    assert "ZeroDivisionError" in logs[0].read_text() and "Traceback" in logs[0].read_text()
    run = _crashing(tmp_path, "run x.csv", "run")
    assert run.returncode == 70 and "rerunning the same command resumes the run" in run.stderr


def test_a_closed_stdout_ends_quietly(tmp_path, sim, run_cli):
    pairs = make_cards(3)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    assert run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", tmp_path / "r").returncode == 0
    for args in (["status", "r"], ["status", "r", "--json"]):
        with subprocess.Popen([sys.executable, "-m", "capbatch", *args], cwd=tmp_path, env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL) as proc:
            proc.stdout.close()      # the reader is gone before anything is written, like `| head -0`
            err = proc.stderr.read().decode()
            proc.wait(timeout=30)
        assert err == "" and proc.returncode == 0, (args, proc.returncode, err)
    shell = subprocess.run(f"{sys.executable} -m capbatch status r | head -1", shell=True, cwd=tmp_path,
                           env=cli_env(), capture_output=True, text=True, timeout=60)
    assert shell.stdout.startswith("run directory: r") and shell.stderr == ""


def _succeeded_so_far(run_dir: Path) -> int:
    """Rows succeeded in a run's ledger, 0 until the run has created its tables (the file comes first)."""
    try:
        return ledger_query(run_dir, "SELECT count(*) FROM rows WHERE state='succeeded'")[0][0]
    except sqlite3.OperationalError:   # no file yet, or no tables in it yet
        return 0


def test_after_kill_9_the_invocation_figures_and_summary_totals_are_right(tmp_path, sim, run_cli):
    pairs = make_cards(120)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "r"
    args = ("run", src, "--base-url", s.url, "--rate", "50/s", "--concurrency", "4", "--run-dir", run_dir)
    proc = popen_cli(*args, cwd=tmp_path)
    began = time.monotonic()
    try:
        while time.monotonic() - began < 30:
            time.sleep(0.2)
            if _succeeded_so_far(run_dir) >= 30:
                break
        killed_after = time.monotonic() - began
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
    sent_before_kill = s.stats()["requests"]
    st = json.loads(run_cli("status", run_dir, "--json").stdout)
    killed = st["invocations"][0]
    assert killed["outcome"] is None and killed["exit_code"] is None
    # recorded in the commits the writer made: at most the last flush's requests are missing
    assert sent_before_kill - 3 * 4 - 10 <= killed["requests"] <= sent_before_kill, (killed, sent_before_kill)
    assert 0.3 < killed["duration"] <= killed_after + 0.5, (killed, killed_after)
    assert killed["started_at"].endswith("+00:00") and "T" in killed["started_at"]   # ISO, as summary.json
    time.sleep(1.0)                     # the pause between the kill and the rerun is no run time
    rerun_began = time.monotonic()
    p = run_cli(*args)
    rerun_took = time.monotonic() - rerun_began
    assert p.returncode == 0, p.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    second = summary["this_invocation"]["requests"]
    assert summary["requests"] == killed["requests"] + second
    assert s.stats()["requests"] - sent_before_kill == second
    assert killed["duration"] < summary["duration_seconds"] <= killed["duration"] + rerun_took
    assert abs(summary["throughput_rows_per_second"] - 120 / summary["duration_seconds"]) < 0.02


def test_status_and_report_leave_no_wal_files_and_work_on_a_read_only_run_dir(tmp_path, sim, run_cli):
    pairs = make_cards(5)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "r"
    assert run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir).returncode == 0
    before = sorted(p.name for p in run_dir.iterdir())
    assert not [n for n in before if n.endswith(("-wal", "-shm"))]
    assert run_cli("status", run_dir).returncode == 0
    assert run_cli("report", run_dir).returncode == 0
    assert sorted(p.name for p in run_dir.iterdir()) == before

    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(f"mount --bind {run_dir} {ro} && mount -o remount,bind,ro {ro}", shell=True,
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {mounted.stderr.strip()}")
    try:
        st = run_cli("status", ro, "--json")
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["counts"]["succeeded"] == 5
        refused = run_cli("report", ro)
        assert refused.returncode == 2 and "--output-dir" in refused.stderr and "read-only" in refused.stderr
        out = run_cli("report", ro, "--output-dir", tmp_path / "out")
        assert out.returncode == 0, out.stderr
        assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"]["succeeded"] == 5
        assert (tmp_path / "out" / "report.html").exists()
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_tls_verification_is_switched_off_only_by_the_flag(tmp_path, run_cli):
    p = run_cli("config", env=cli_env(CAPBATCH_VERIFY_TLS="0"))
    assert p.returncode == 2 and "CAPBATCH_VERIFY_TLS" in p.stderr and "--no-verify-tls" in p.stderr
    (tmp_path / "capbatch.toml").write_text("[capbatch]\nverify_tls = false\n")
    p = run_cli("config")
    assert p.returncode == 2 and "verify_tls" in p.stderr and "--no-verify-tls" in p.stderr


def test_both_credential_pairs_are_refused_unless_auth_chooses(tmp_path, sim, run_cli):
    pairs = make_cards(2)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    both = cli_env(CAPILLARY_CLIENT_KEY="demo-key", CAPILLARY_CLIENT_SECRET="demo-secret")
    p = run_cli("run", src, "--base-url", s.url, "--run-dir", tmp_path / "a", env=both)
    assert p.returncode == 2, p.stderr
    for name in ("CAPILLARY_USERNAME", "CAPILLARY_PASSWORD", "CAPILLARY_CLIENT_KEY", "CAPILLARY_CLIENT_SECRET",
                 "--auth"):
        assert name in p.stderr
    assert s.stats()["requests"] == 0
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--auth", "basic", "--run-dir",
                tmp_path / "b", env=both)
    assert p.returncode == 0 and "auth basic" in p.stderr, p.stderr
    assert s.stats()["tokens_issued"] == 0
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--auth", "oauth", "--run-dir",
                tmp_path / "c", env=both)
    assert p.returncode == 0 and "auth oauth" in p.stderr and s.stats()["tokens_issued"] >= 1


def test_a_misspelled_capbatch_variable_is_named_with_its_close_match(run_cli):
    p = run_cli("config", env=cli_env(CAPBATCH_CONCURENCY="8", CAPBATCH_WHATEVER="1"))
    assert p.returncode == 0, p.stderr
    assert "CAPBATCH_CONCURENCY is not a capbatch setting and is ignored: did you mean CAPBATCH_CONCURRENCY?" \
        in p.stderr
    assert "CAPBATCH_WHATEVER is not a capbatch setting" in p.stderr


def test_unwritable_outputs_are_exit_2_naming_the_flag_and_nothing_is_sent(tmp_path, sim, run_cli):
    pairs = make_cards(2)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    (tmp_path / "afile").write_text("x")
    p = run_cli("run", src, "--base-url", s.url, "--reports-dir", tmp_path / "afile" / "reports")
    assert p.returncode == 2 and "--reports-dir" in p.stderr, p.stderr
    p = run_cli("run", src, "--base-url", s.url, "--run-dir", tmp_path / "afile" / "run")
    assert p.returncode == 2 and "--run-dir" in p.stderr, p.stderr
    p = run_cli("run", src, "--base-url", s.url, "--run-dir", tmp_path / "r", "--metrics-file",
                tmp_path / "afile" / "m.prom")
    assert p.returncode == 2 and "--metrics-file" in p.stderr and "cannot be written" in p.stderr, p.stderr
    assert s.stats()["requests"] == 0


def test_every_option_has_help_and_defaults_are_shown_one_way():
    from capbatch.cli import main

    missing, shown = [], []
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                if not (param.help or "").strip():
                    missing.append(f"{name} {param.opts[0]}")
                if param.show_default:
                    shown.append(f"{name} {param.opts[0]}")
                if "default" in (param.help or "").lower() and "(default" not in (param.help or ""):
                    shown.append(f"{name} {param.opts[0]}: {param.help}")
    assert missing == [] and shown == []


def test_demo_runs_from_a_built_wheel_without_the_checkout(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(REPO)], check=True, capture_output=True, timeout=120)
    wheel = next(wheel_dir.glob("capbatch-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    assert (site / "capbatch" / "data" / "cards.csv").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(cli_env(), PYTHONPATH=str(site))
    p = subprocess.run([sys.executable, "-m", "capbatch", "demo", "--latency", "0", "--rate", "unlimited",
                        "--progress", "none"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "demo complete" in p.stderr
    loaded = subprocess.run([sys.executable, "-c", "import capbatch; print(capbatch.__file__)"], cwd=work, env=env,
                            capture_output=True, text=True)
    assert loaded.stdout.startswith(str(site))          # the wheel's copy ran, not the checkout
