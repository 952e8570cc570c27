"""Nightly reconciliation, job memory, verify, generated IDs, and the read-only preview."""

from __future__ import annotations

import json
import signal
import time

from conftest import ledger_rows, make_cards, popen_cli, read_csv, write_csv


def test_reconcile_sends_puts_only_for_what_drifted(tmp_path, sim, run_cli):
    pairs = make_cards(40)
    cards: dict[str, str | None] = {}
    for i, (card, ext) in enumerate(pairs):
        cards[card] = ext if i < 20 else (f"OLD{i}" if i < 30 else None)   # half applied, 10 drifted, 10 empty
    s = sim(cards=cards)
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    p = run_cli("run", src, "--mode", "reconcile", "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir)
    assert p.returncode == 0, p.stderr
    stats = s.stats()
    assert stats["by_route"]["PUT /v2/card"] == 20
    assert set(stats["puts_per_card"]) == {c for c, _ in pairs[20:]}
    assert s.card_ids() == dict(pairs)
    rows = ledger_rows(run_dir)
    assert [r["state"] for r in rows] == ["unchanged"] * 20 + ["succeeded"] * 20
    assert [r["previous_external_id"] for r in rows[20:30]] == [f"OLD{i}" for i in range(20, 30)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["drifted"] == 10 and summary["counts"]["unchanged"] == 20
    results = read_csv(run_dir / "results.csv")
    assert results[25]["capbatch_previous_external_id"] == "OLD25"


def test_reconcile_unknown_card_fails_with_3010_without_a_put(tmp_path, sim, run_cli):
    s = sim(cards={"0001": None})
    src = write_csv(tmp_path / "cards.csv", [("0001", "A1"), ("0404", "A2")])
    p = run_cli("run", src, "--mode", "reconcile", "--base-url", s.url, "--rate", "unlimited", "--run-dir", tmp_path / "r")
    assert p.returncode == 1
    assert "0404" not in s.stats()["puts_per_card"]
    assert {r["card"]: r["error_code"] for r in ledger_rows(tmp_path / "r")}["0404"] == "3010"


def test_skip_confirmed_second_night_sends_only_what_changed(tmp_path, sim, run_cli):
    pairs = make_cards(200)
    s = sim(cards={c: None for c, _ in pairs})
    night1 = write_csv(tmp_path / "export-1.csv", pairs)
    args = ("--base-url", s.url, "--rate", "unlimited", "--job", "nightly", "--skip-confirmed")
    assert run_cli("run", night1, *args).returncode == 0
    # night 2: a fresh export (rows reordered, so new content and a new run dir) with nothing changed
    night2 = write_csv(tmp_path / "export-2.csv", list(reversed(pairs)))
    before = s.stats()["requests"]
    p = run_cli("run", night2, *args)
    assert p.returncode == 0, p.stderr
    assert s.stats()["requests"] == before          # zero requests
    # night 3: two pairs changed
    changed = list(pairs)
    changed[5] = (changed[5][0], "NEW-5")
    changed[77] = (changed[77][0], "NEW-77")
    night3 = write_csv(tmp_path / "export-3.csv", changed)
    before_puts = s.stats()["by_route"]["PUT /v2/card"]
    p = run_cli("run", night3, *args)
    assert p.returncode == 0, p.stderr
    assert s.stats()["by_route"]["PUT /v2/card"] - before_puts == 2
    assert s.card_ids()[pairs[5][0]] == "NEW-5"
    h = run_cli("history", "--job", "nightly", "--json")
    runs = json.loads(h.stdout)
    assert len(runs) == 3 and runs[1]["requests"] == 0 and runs[1]["counts"]["unchanged"] == 200
    assert "no runs recorded for job 'other'" in run_cli("history", "--job", "other").stdout
    text = run_cli("history", "--job", "nightly").stdout
    assert "export-3.csv" in text


def test_skip_confirmed_requires_a_job(tmp_path, run_cli):
    src = write_csv(tmp_path / "c.csv", make_cards(1))
    p = run_cli("run", src, "--base-url", "http://127.0.0.1:9", "--skip-confirmed")
    assert p.returncode == 2 and "--job" in p.stderr


def test_verify_finds_a_card_changed_behind_our_back(tmp_path, sim, run_cli):
    pairs = make_cards(30)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    assert run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir).returncode == 0
    ok = run_cli("verify", run_dir, "--base-url", s.url, "--rate", "unlimited")
    assert ok.returncode == 0, ok.stderr
    s.update(cards={pairs[7][0]: "SOMEONE-ELSE"})
    puts = s.stats()["by_route"]["PUT /v2/card"]
    bad = run_cli("verify", run_dir, "--base-url", s.url, "--rate", "unlimited")
    assert bad.returncode == 1
    assert s.stats()["by_route"]["PUT /v2/card"] == puts   # read-only
    rows = {r["cardNumber"]: r for r in read_csv(run_dir / "verify.csv")}
    assert rows[pairs[7][0]]["status"] == "differs"
    assert rows[pairs[7][0]]["actual_external_id"] == "SOMEONE-ELSE"
    # verify an input file directly
    p = run_cli("verify", src, "--base-url", s.url, "--rate", "unlimited")
    assert p.returncode == 1 and "differ" in p.stderr


def test_generate_missing_survives_kills_with_one_id_per_card(tmp_path, sim, run_cli):
    pairs = [(c, "") for c, _ in make_cards(400)]
    s = sim(cards={c: None for c, _ in pairs}, latency=0.005)
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    args = ("run", src, "--base-url", s.url, "--rate", "unlimited", "--generate-missing", "--run-dir", run_dir)
    for delay in (0.8, 1.2):
        proc = popen_cli(*args, cwd=tmp_path)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    rows = ledger_rows(run_dir)
    assert all(r["state"] == "succeeded" and r["generated"] == 1 for r in rows)
    final = s.card_ids()
    assert all(final[r["card"]] == r["external_id"] for r in rows)
    assert len({r["external_id"] for r in rows}) == 400
    # no card ever had its ID replaced by a second generated one
    assert max(s.stats()["applied_per_card"].values()) == 1
    results = read_csv(run_dir / "results.csv")
    assert all(r["capbatch_generated"] == "yes" and r["capbatch_sent_external_id"] for r in results)


def test_empty_external_id_is_rejected_without_generate_missing(tmp_path, sim, run_cli):
    s = sim(cards={"0001": None})
    src = write_csv(tmp_path / "c.csv", [("0001", "")])
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", tmp_path / "r")
    assert p.returncode == 1 and s.stats()["requests"] == 0


def test_dry_run_check_remote_reads_and_writes_nothing(tmp_path, sim, run_cli):
    pairs = make_cards(12)
    cards = {c: (e if i < 4 else None) for i, (c, e) in enumerate(pairs[:8])}   # 4 already set, 4 empty, 4 unknown
    s = sim(cards=cards)
    src = write_csv(tmp_path / "cards.csv", pairs)
    p = run_cli("run", src, "--dry-run", "--check-remote", "--base-url", s.url, "--rate", "unlimited", "--json")
    assert p.returncode == 1, p.stderr   # some cards do not exist
    result = json.loads(p.stdout)
    assert result["remote"] == {"match": 4, "differs": 4, "missing": 4, "error": 0}
    stats = s.stats()
    assert stats["by_route"].get("PUT /v2/card", 0) == 0 and stats["by_route"]["GET /v2/card"] == 12
    assert s.card_ids() == cards
    assert not any(p.name == "ledger.sqlite" for p in tmp_path.rglob("*"))
    # plain --dry-run: no network at all
    before = s.stats()["requests"]
    p = run_cli("run", src, "--dry-run", "--base-url", s.url)
    assert p.returncode == 0 and s.stats()["requests"] == before
