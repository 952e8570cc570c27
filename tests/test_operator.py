"""What an operator sees: output off a terminal, quiet mode, exit codes, the library API."""

from __future__ import annotations

import json

import pytest

from conftest import cli_env, make_cards, write_csv


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
