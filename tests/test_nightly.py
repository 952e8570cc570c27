"""Nightly jobs (the README's own recipe), the rolling audit, --retry-failed, and revert."""

from __future__ import annotations

import json
import re
import shlex
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import REPO, ledger_query, ledger_rows, make_cards, popen_cli, read_csv, write_csv

from capbatch.config import resolve
from capbatch.errors import UsageError


def readme_nightly_command() -> list[str]:
    """The nightly command as the README's cron, systemd and Kubernetes recipes all spell it."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.findall(r"capbatch run /data/export\.csv[^\"\n>]*", text)
    commands = {c.strip() for c in found}
    assert len(found) >= 4 and len(commands) == 1, commands   # the example + cron + systemd + k8s
    return shlex.split(commands.pop())[1:]


def recipe(src: Path, url: str, reports: Path) -> list[str]:
    """The README's command with only the input, the target and the state directory swapped."""
    args = readme_nightly_command()
    args[args.index("/data/export.csv")] = str(src)
    at = args.index("--cluster")
    args[at:at + 2] = ["--base-url", url]
    args[args.index("--reports-dir") + 1] = str(reports)
    return args


def puts(s) -> int:
    return s.stats()["by_route"].get("PUT /v2/card", 0)


def gets(s) -> int:
    return s.stats()["by_route"].get("GET /v2/card", 0)


def test_readme_recipe_holds_up_over_three_nights(tmp_path, sim, run_cli):
    pairs = make_cards(30)
    s = sim(cards={c: None for c, _ in make_cards(40)})
    reports = tmp_path / "state"
    # night 1: a fresh job, every pair new
    night1 = write_csv(tmp_path / "export.csv", pairs[:24])
    p = run_cli(*recipe(night1, s.url, reports))
    assert p.returncode == 0, p.stderr
    assert puts(s) == 24
    # night 2: the export is regenerated in place: 2 IDs changed, 3 cards new, the rest as before
    night2 = [(c, f"NEW{i}") if i in (3, 17) else (c, e) for i, (c, e) in enumerate(pairs[:27])]
    write_csv(tmp_path / "export.csv", night2)
    p = run_cli(*recipe(night1, s.url, reports))
    assert p.returncode == 0, p.stderr
    assert puts(s) == 24 + 5                       # only the changed and the new pairs
    # night 3: identical export again, plus 3 new cards
    write_csv(tmp_path / "export.csv", night2 + pairs[27:30])
    p = run_cli(*recipe(night1, s.url, reports))
    assert p.returncode == 0, p.stderr
    assert puts(s) == 24 + 5 + 3
    final = s.card_ids()
    assert {c: final[c] for c, _ in night2 + pairs[27:30]} == dict(night2 + pairs[27:30])
    assert max(s.stats()["applied_per_card"].values()) <= 2   # no card written more than needed
    runs = json.loads(run_cli("history", "--job", "nightly", "--reports-dir", reports, "--json").stdout)
    assert [r["exit_code"] for r in runs] == [0, 0, 0]
    assert len({r["run_dir"] for r in runs}) == 3 and all("/nightly/export-" in r["run_dir"] for r in runs)
    assert [r["counts"]["succeeded"] for r in runs] == [24, 5, 3]
    # the audit re-read ceil(0.05 x 22) and ceil(0.05 x 27) confirmed pairs on nights 2 and 3
    assert [json.loads((Path(r["run_dir"]) / "summary.json").read_text()).get("audit", {}).get("rows", 0)
            for r in runs] == [0, 2, 2]


def test_audit_slice_rereads_every_pair_once_and_fixes_drift(tmp_path, sim, run_cli):
    pairs = make_cards(20)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "export.csv", pairs)
    args = ("run", src, "--base-url", s.url, "--rate", "unlimited", "--job", "j", "--skip-confirmed",
            "--audit-fraction", "0.25", "--reports-dir", tmp_path / "r")
    assert run_cli(*args).returncode == 0
    drifted = {pairs[4][0]: "OTHER-SYSTEM-4", pairs[13][0]: None}     # one changed, one cleared
    s.update(cards=drifted)
    audited: list[str] = []
    for night in range(2, 6):   # the same export every night: each night is a new run all the same
        before_gets, before_puts = gets(s), puts(s)
        p = run_cli(*args)
        assert p.returncode == 0, p.stderr
        run_dir = tmp_path / "r" / "j" / f"{Path(src).stem}-{_hash(tmp_path / 'r' / 'j')}-{night}"
        rows = ledger_query(run_dir, "SELECT card, state, previous_external_id FROM rows WHERE audit=1")
        assert len(rows) == 5
        audited += [r["card"] for r in rows]
        fixed = {r["card"]: r["previous_external_id"] for r in rows if r["state"] == "succeeded"}
        assert fixed == {c: v or "" for c, v in drifted.items() if c in fixed}
        assert gets(s) - before_gets == 5                # the slice, nothing more
        assert puts(s) - before_puts == len(fixed)       # a PUT only where the ID drifted
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["audit"] == {"rows": 5, "still_held": 5 - len(fixed), "drift_fixed": len(fixed),
                                    "failed": 0, "pending": 0}
        assert f"audit: 5 re-read, {len(fixed)} drifted and put back" in p.stderr
    assert sorted(audited) == sorted(c for c, _ in pairs)          # every pair once over 1/F nights
    assert s.card_ids() == dict(pairs)                              # drift put back


def _hash(job_dir: Path) -> str:
    return next(job_dir.glob("export-*")).name.split("-")[1]


def test_retry_failed_resends_only_the_failed_rows(tmp_path, sim, run_cli):
    pairs = make_cards(8)
    s = sim(cards={c: None for c, _ in pairs[:6]})                  # the last two cards do not exist yet
    src = write_csv(tmp_path / "c.csv", pairs, extra_rows=[["0099", "N/A"]])
    run_dir = tmp_path / "run"
    args = ("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir)
    assert run_cli(*args).returncode == 1
    assert [r["state"] for r in ledger_rows(run_dir)] == ["succeeded"] * 6 + ["failed"] * 2 + ["rejected"]
    assert run_cli(*args).returncode == 1 and puts(s) == 8            # a plain rerun sends nothing
    s.update(cards={c: None for c, _ in pairs[6:]})                  # the cards are created since
    p = run_cli(*args, "--retry-failed")
    assert p.returncode == 1, p.stderr                               # the rejected row stays rejected
    assert "2 failed rows go out again" in p.stderr and "plan: 2 rows → 2 requests" in p.stderr
    assert s.stats()["puts_per_card"] == {c: (2 if i >= 6 else 1) for i, (c, _) in enumerate(pairs)}
    rows = ledger_rows(run_dir)
    assert [r["state"] for r in rows] == ["succeeded"] * 8 + ["rejected"]
    assert [r["attempts"] for r in rows[6:8]] == [2, 2]
    assert rows[6]["note"] == "earlier attempt failed: 3010 Card number does not exist"
    assert rows[8]["reason_code"] and rows[8]["attempts"] == 0
    assert s.card_ids() == dict(pairs)


def test_revert_of_a_reconcile_run_restores_what_it_can_and_says_why_not(tmp_path, sim, run_cli):
    pairs = make_cards(16)
    before = {c: f"OLD{i}" for i, (c, _) in enumerate(pairs[:10])}      # overwritten: revertible
    before.update({c: None for c, _ in pairs[10:13]})                   # no ID before: not revertible
    before.update(dict(pairs[13:16]))                                   # already right: untouched
    s = sim(cards=before)
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    run = ("run", src, "--mode", "reconcile", "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir)
    assert run_cli(*run).returncode == 0
    s.update(cards={pairs[2][0]: "SOMEONE-ELSE", pairs[7][0]: "SOMEONE-ELSE-7"})   # changed since
    requests = s.stats()["requests"]
    # dry run: the plan, from the ledger alone
    p = run_cli("revert", run_dir, "--dry-run", "--json")
    assert p.returncode == 1, p.stderr
    assert s.stats()["requests"] == requests
    preview = json.loads(p.stdout)
    assert preview["would_revert"] == 10 and preview["not_revertible"]["no_previous_id"] == 3
    plan = {r["cardNumber"]: r for r in read_csv(run_dir / "revert.dry-run.csv")}
    assert plan[pairs[0][0]]["restore_to"] == "OLD0" and plan[pairs[0][0]]["action"] == "revert"
    assert plan[pairs[11][0]]["action"] == "not revertible: no_previous_id"
    assert not (run_dir / "revert").exists()
    # the revert
    p = run_cli("revert", run_dir, "--rate", "unlimited", "--json")
    assert p.returncode == 1, p.stderr
    expected = {**{c: f"OLD{i}" for i, (c, _) in enumerate(pairs[:10])}, **dict(pairs[10:16]),
                pairs[2][0]: "SOMEONE-ELSE", pairs[7][0]: "SOMEONE-ELSE-7"}
    assert s.card_ids() == expected
    assert puts(s) == 13 + 8                           # the run's 13, then one per restored card
    summary = json.loads(p.stdout)
    r = summary["revert"]
    assert (r["restored"], r["changed_since"], r["failed"], r["pending"]) == (8, 2, 0, 0)
    assert r["not_revertible"] == {"no_previous_id": 3, "previous_unknown": 0, "outcome_unknown": 0}
    assert any("no documented way to clear" in note for note in r["notes"])
    assert "no documented way to clear" in p.stderr
    failures = {f["cardNumber"]: f for f in read_csv(run_dir / "revert" / "failures.csv")}
    assert failures[pairs[2][0]]["capbatch_error_code"] == "changed_since"
    assert failures[pairs[11][0]]["capbatch_error_code"] == "no_previous_id"
    assert len(failures) == 5
    # rerunning resumes (nothing left), and the reverted run itself cannot be resumed any more
    puts_now = puts(s)
    assert run_cli("revert", run_dir, "--rate", "unlimited").returncode == 1 and puts(s) == puts_now
    p = run_cli(*run)
    assert p.returncode == 2 and "was reverted" in p.stderr


def test_revert_needs_previous_ids_and_record_previous_gives_them(tmp_path, sim, run_cli):
    pairs = make_cards(6)
    s = sim(cards={c: f"OLD{i}" for i, (c, _) in enumerate(pairs)})
    src = write_csv(tmp_path / "cards.csv", pairs)
    plain, recorded = tmp_path / "plain", tmp_path / "recorded"
    assert run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", plain).returncode == 0
    p = run_cli("revert", plain, "--base-url", s.url, "--rate", "unlimited", "--json")
    assert p.returncode == 1
    assert json.loads(p.stdout)["revert"]["not_revertible"]["previous_unknown"] == 6
    assert s.card_ids() == dict(pairs) and gets(s) == 0             # the plain run reads nothing
    s.update(cards={c: f"OLD{i}" for i, (c, _) in enumerate(pairs)})
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", recorded, "--record-previous")
    assert p.returncode == 0
    assert [r["previous_external_id"] for r in ledger_rows(recorded)] == [f"OLD{i}" for i in range(6)]
    p = run_cli("revert", recorded, "--rate", "unlimited")
    assert p.returncode == 0, p.stderr
    assert s.card_ids() == {c: f"OLD{i}" for i, (c, _) in enumerate(pairs)}
    # another target than the run's is refused before anything is sent
    p = run_cli("revert", recorded, "--base-url", "http://127.0.0.1:9")
    assert p.returncode == 2 and "not http://127.0.0.1:9" in p.stderr


def _reverted(run_dir: Path) -> int:
    """Rows the revert has settled so far (0 until its ledger has its tables)."""
    try:
        return ledger_query(run_dir / "revert", "SELECT count(*) FROM rows WHERE state='succeeded'")[0][0]
    except sqlite3.OperationalError:
        return 0


def test_revert_resumes_after_a_kill(tmp_path, sim, run_cli):
    pairs = make_cards(120)
    s = sim(cards={c: f"OLD{i}" for i, (c, _) in enumerate(pairs)})
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    assert run_cli("run", src, "--mode", "reconcile", "--base-url", s.url, "--rate", "unlimited",
                   "--run-dir", run_dir).returncode == 0
    s.update(latency=0.05)
    proc = popen_cli("revert", run_dir, "--rate", "unlimited", "--concurrency", "4", cwd=tmp_path)
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None and _reverted(run_dir) < 20:
        time.sleep(0.02)
    assert proc.poll() is None, "the revert ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = ledger_query(run_dir / "revert", "SELECT count(*) AS n FROM rows WHERE state='succeeded'")[0]["n"]
    assert 0 < done < 120
    s.update(latency=0.0)
    p = run_cli("revert", run_dir, "--rate", "unlimited")
    assert p.returncode == 0, p.stderr
    assert s.card_ids() == {c: f"OLD{i}" for i, (c, _) in enumerate(pairs)}
    assert max(s.stats()["applied_per_card"].values()) == 2        # the run's write, one revert write


def test_job_guards(tmp_path, sim, run_cli):
    pairs = make_cards(3)
    s = sim(cards={c: None for c, _ in pairs})
    reports = tmp_path / "r"
    src = write_csv(tmp_path / "export.csv", pairs)
    # a fixed --run-dir on a changed export: the error points at --job
    fixed = ("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", tmp_path / "fixed")
    assert run_cli(*fixed).returncode == 0
    write_csv(tmp_path / "export.csv", pairs[:2])
    p = run_cli(*fixed)
    assert p.returncode == 2 and "belongs to different input content" in p.stderr and "--job NAME" in p.stderr
    # --audit-fraction needs --skip-confirmed; out of range is refused
    job = ("run", src, "--base-url", s.url, "--rate", "unlimited", "--job", "eu", "--reports-dir", reports)
    p = run_cli(*job, "--audit-fraction", "0.1")
    assert p.returncode == 2 and "--audit-fraction needs --skip-confirmed" in p.stderr
    with pytest.raises(UsageError, match="out of range"):
        resolve({"audit_fraction": "1.5"}, {})
    p = run_cli(*job, "--run-dir", reports / "eu")
    assert p.returncode == 2 and "drop --run-dir" in p.stderr
    # a job remembers its target
    assert run_cli(*job, "--skip-confirmed").returncode == 0
    other = sim(cards={c: None for c, _ in pairs})
    p = run_cli("run", src, "--base-url", other.url, "--rate", "unlimited", "--job", "eu", "--reports-dir", reports)
    assert p.returncode == 2 and f"job eu writes to {s.url}" in p.stderr and other.stats()["requests"] == 0
    # forget: the next run sends every row again
    assert "forgot all 2 confirmed pairs" in run_cli("forget", "--job", "eu", "--reports-dir", reports).stdout
    before = puts(s)
    assert run_cli(*job, "--skip-confirmed").returncode == 0 and puts(s) - before == 2
    # one run of a job at a time
    s.update(latency=0.3)
    write_csv(tmp_path / "export.csv", pairs)
    proc = popen_cli(*job, "--concurrency", "1", cwd=tmp_path)
    assert proc.stdout is not None
    for line in proc.stdout:          # the lock is held from before the input is read
        if "target " in line:
            break
    p = run_cli(*job)
    proc.send_signal(signal.SIGTERM)
    proc.communicate()
    assert p.returncode == 2 and "is running on" in p.stderr and "eu" in p.stderr


def test_revert_of_a_job_run_updates_the_job_memory(tmp_path, sim, run_cli):
    pairs = make_cards(4)
    s = sim(cards={c: f"OLD{i}" for i, (c, _) in enumerate(pairs)})
    src = write_csv(tmp_path / "export.csv", pairs)
    reports = tmp_path / "r"
    night = ("run", src, "--mode", "reconcile", "--base-url", s.url, "--rate", "unlimited", "--job", "j",
             "--skip-confirmed", "--reports-dir", reports)
    assert run_cli(*night).returncode == 0
    run_dir = Path(json.loads(run_cli("history", "--job", "j", "--reports-dir", reports, "--json").stdout)[0]["run_dir"])
    s.update(cards={pairs[3][0]: "ELSE"})
    p = run_cli("revert", run_dir, "--rate", "unlimited")
    assert p.returncode == 1, p.stderr                     # one card changed since: left alone
    assert s.card_ids() == {**{c: f"OLD{i}" for i, (c, _) in enumerate(pairs[:3])}, pairs[3][0]: "ELSE"}
    runs = json.loads(run_cli("history", "--job", "j", "--reports-dir", reports, "--json").stdout)
    assert [r["input_name"] for r in runs] == ["export.csv", f"revert of {run_dir.name}"]
    # next night, the same export: the job no longer believes the reverted or changed pairs hold
    before = puts(s)
    assert run_cli(*night).returncode == 0
    assert puts(s) - before == 4 and s.card_ids() == dict(pairs)


def test_a_ledger_from_before_the_audit_and_revert_columns_is_upgraded(tmp_path):
    import sqlite3

    from capbatch.ledger import SCHEMA_VERSION, Ledger

    with Ledger.open(tmp_path) as ledger:
        ledger.import_rows([(None, 2, '["1","A"]', "1", "A", "pending", None, None, None)])
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    conn.executescript("DROP INDEX rows_audited; "
                       "ALTER TABLE rows DROP COLUMN audit; ALTER TABLE rows DROP COLUMN expect_external_id; "
                       "ALTER TABLE rows DROP COLUMN warnings; "
                       "UPDATE meta SET value='1' WHERE key='schema_version';")
    conn.close()
    with Ledger.open_readonly(tmp_path) as old:
        assert old.audit_counts() == {}                 # reports still work on the old file, read-only
    with Ledger.open(tmp_path) as ledger:
        assert ledger.get_meta("schema_version") == str(SCHEMA_VERSION)
        row = ledger.pending_page(0, 10)[0]
        assert (row.card, row.audit, row.expect) == ("1", False, None)
        plan = ledger.conn.execute("EXPLAIN QUERY PLAN SELECT state, count(*) FROM rows WHERE audit=1 "
                                   "GROUP BY state").fetchall()
        assert "rows_audited" in str(plan)              # the upgraded file has the audit's index too
