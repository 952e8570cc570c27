"""The backfill pipeline end to end: the real CLI in a subprocess, a real simulator, a real ledger."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO, cli_env, ledger_rows, make_cards, read_csv, write_csv


def states(run_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in ledger_rows(run_dir):
        out[r["state"]] = out.get(r["state"], 0) + 1
    return out


def test_happy_path_sends_every_card_exactly_as_typed(tmp_path, sim, run_cli):
    pairs = make_cards(300)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir)
    assert p.returncode == 0, p.stderr
    assert s.card_ids() == dict(pairs)  # leading zeros intact, every ID applied
    assert states(run_dir) == {"succeeded": 300}
    assert all(n == 1 for n in s.stats()["puts_per_card"].values())
    rows = ledger_rows(run_dir)
    assert rows[0]["row_number"] == 2 and rows[-1]["row_number"] == 301
    assert rows[0]["card_id"] and rows[0]["customer_id"] and rows[0]["http_status"] == 200
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["counts"]["succeeded"] == 300
    assert (run_dir / "results.csv").exists() and (run_dir / "failures.csv").exists()
    assert "done: 300 succeeded" in p.stderr
    # a rerun of the same command is a no-op: nothing left to send
    before = s.stats()["requests"]
    again = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir)
    assert again.returncode == 0, again.stderr
    assert s.stats()["requests"] == before


def test_default_run_dir_is_derived_from_input_name_and_content(tmp_path, sim, run_cli):
    pairs = make_cards(5)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "night.csv", pairs)
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited")
    assert p.returncode == 0, p.stderr
    dirs = list((tmp_path / "reports").iterdir())
    assert len(dirs) == 1 and dirs[0].name.startswith("night-") and len(dirs[0].name) == len("night-") + 12


def test_per_row_failures_3010_3045_and_errors_under_2xx(tmp_path, sim, run_cli):
    pairs = make_cards(20)
    cards = {c: None for c, _ in pairs}
    cards["0099999999999999"] = "TAKEN-ID"          # holds an ID another row wants
    s = sim(cards=cards, errors_status=201)          # business errors arrive as HTTP 201
    rows = pairs + [("0055555555555555", "EXT-UNKNOWN"), (pairs[0][0][:-1] + "X", "EXT-X"),
                    ("0011111111111111", "TAKEN-ID")]
    cards["0011111111111111"] = None
    s.update(cards={"0011111111111111": None})
    src = write_csv(tmp_path / "cards.csv", rows)
    run_dir = tmp_path / "run"
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir)
    assert p.returncode == 1, p.stderr
    by_card = {r["card"]: r for r in ledger_rows(run_dir)}
    assert by_card["0055555555555555"]["state"] == "failed"
    assert by_card["0055555555555555"]["error_code"] == "3010"
    assert by_card["0055555555555555"]["http_status"] == 201
    assert by_card["0011111111111111"]["state"] == "failed"
    assert by_card["0011111111111111"]["error_code"] == "3045"
    assert s.card_ids()["0099999999999999"] == "TAKEN-ID"
    # permanent errors are not retried
    assert by_card["0055555555555555"]["attempts"] == 1
    failures = read_csv(run_dir / "failures.csv")
    assert {f["cardNumber"] for f in failures} >= {"0055555555555555", "0011111111111111"}


def test_invalid_rows_are_rejected_with_row_numbers_and_never_sent(tmp_path, sim, run_cli):
    pairs = make_cards(3)
    s = sim(cards={c: None for c, _ in pairs}, auto_create=True)
    src = write_csv(tmp_path / "cards.csv", pairs, extra_rows=[
        ["0012345678901234", ""], ["", "EXT-NO-CARD"], ["0012345678901235", "N/A"],
        ["0012345678901236", "X" * 51]])
    run_dir = tmp_path / "run"
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir)
    assert p.returncode == 1, p.stderr
    rejected = {r["row_number"]: r["reason_code"] for r in ledger_rows(run_dir) if r["state"] == "rejected"}
    assert rejected == {5: "missing_external_id", 6: "missing_card", 7: "placeholder", 8: "too_long"}
    assert set(s.stats()["puts_per_card"]) == {c for c, _ in pairs}
    assert "row 5:" in p.stderr


def test_changed_input_is_refused_for_an_existing_run_dir(tmp_path, sim, run_cli):
    pairs = make_cards(5)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    assert run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir).returncode == 0
    write_csv(src, pairs[:4] + [(pairs[4][0], "EXT-CHANGED")])
    before = s.stats()["requests"]
    p = run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir)
    assert p.returncode == 2
    assert "different input content" in p.stderr and "Traceback" not in p.stderr
    assert s.stats()["requests"] == before


def test_a_second_process_on_the_same_run_dir_is_refused(tmp_path):
    from capbatch.errors import LedgerError
    from capbatch.ledger import Ledger

    first = Ledger.open(tmp_path / "run")
    try:
        try:
            Ledger.open(tmp_path / "run")
        except LedgerError as exc:
            assert "another capbatch process" in str(exc)
        else:
            raise AssertionError("second writer was not refused")
    finally:
        first.close()
    Ledger.open(tmp_path / "run").close()  # the lock dies with its holder


def test_xlsx_sample_runs_with_exact_card_numbers(tmp_path, sim, run_cli):
    from capbatch.source import InputOptions, open_input

    sample = REPO / "samples" / "cards.xlsx"
    cards = {r.card.strip(): None for r in open_input(sample, InputOptions()).rows() if r.card.strip()}
    s = sim(cards=cards)
    run_dir = tmp_path / "run"
    p = run_cli("run", sample, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir)
    assert p.returncode == 1, p.stderr  # the sample carries deliberate bad rows
    sent = s.stats()["puts_per_card"]
    typed = {row["cardNumber"].strip(" \u00a0") for row in read_csv(REPO / "samples" / "cards.csv")}
    assert set(sent) - {"1234567"} <= typed    # the same text as the CSV twin, leading zeros included
    assert any(c.startswith("00") for c in sent)
    assert "4111111111111111" not in sent and "411111111111111" not in sent  # the 16-digit number typed as a number
    by_row = {r["row_number"]: r for r in ledger_rows(run_dir)}
    assert by_row[max(by_row)]["card"] == "1234567" and by_row[max(by_row)]["state"] == "succeeded"


def test_status_command_prints_counts(tmp_path, sim, run_cli):
    pairs = make_cards(4)
    s = sim(cards={c: None for c, _ in pairs})
    src = write_csv(tmp_path / "cards.csv", pairs)
    run_dir = tmp_path / "run"
    assert run_cli("run", src, "--base-url", s.url, "--rate", "unlimited", "--run-dir", run_dir).returncode == 0
    p = run_cli("status", run_dir)
    assert p.returncode == 0 and "succeeded" in p.stdout and "4" in p.stdout
    p = run_cli("status", run_dir, "--json")
    assert json.loads(p.stdout)["counts"]["succeeded"] == 4


def test_user_errors_are_messages_with_a_fix_not_tracebacks(tmp_path, sim, run_cli):
    src = write_csv(tmp_path / "cards.csv", make_cards(2))
    cases = [
        (("run", tmp_path / "missing.csv", "--base-url", "http://127.0.0.1:9"), "does not exist", None),
        (("run", src, "--base-url", "http://example.com"), "refusing plain http", None),
        (("run", src, "--base-url", "http://127.0.0.1:9", "--rate", "fast"), "not a rate", None),
        (("run", src), "no API target", None),
        (("run", src, "--base-url", "http://127.0.0.1:9"), "no Capillary credentials",
         {k: v for k, v in cli_env().items() if not k.startswith("CAPILLARY_")}),
    ]
    for args, expected, env in cases:
        p = run_cli(*args, env=env)
        assert p.returncode == 2, (args, p.stderr)
        assert expected in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr
        assert "->" in p.stderr  # every message names the fix
