"""capbatch from code: DataFrames and pairs in, DataFrames out, and the manners of a guest in a host process.

Every run goes to the real simulator on loopback; values are checked where they land (``card_ids()``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types

import pandas as pd
import pytest
from conftest import REPO, cli_env, ledger_query, make_cards, write_csv

import capbatch

ENV = {"CAPILLARY_USERNAME": "demo", "CAPILLARY_PASSWORD": "demo"}


@pytest.fixture
def fast(tmp_path):
    """The settings every quick run here shares: no rate cap, no progress, reports under tmp_path."""
    return {"rate": "unlimited", "progress": "none", "reports_dir": str(tmp_path / "reports"), "env": ENV}


def frame(pairs, index=None) -> pd.DataFrame:
    return pd.DataFrame({"cardNumber": [c for c, _ in pairs], "cardExternalId": [e for _, e in pairs]},
                        index=index)


# ---- DataFrames in --------------------------------------------------------------------------------------
def test_a_dataframe_of_text_is_sent_exactly_and_labelled_by_its_index_and_resumes(tmp_path, sim, fast):
    pairs = make_cards(6)                                    # "00000000000000NN": leading zeros on purpose
    s = sim(cards={c: None for c, _ in pairs})
    df = frame(pairs, index=[10, 11, 12, 13, 14, 15]).astype("string")   # a nullable string dtype works too
    df["store"] = ["A", "B", "C", "D", "E", "F"]            # other columns travel into the reports

    summary = capbatch.run_backfill(df, base_url=s.url, **fast)

    assert isinstance(summary, capbatch.Summary) and summary.exit_code == 0 and summary["exit_code"] == 0
    assert s.card_ids() == dict(pairs)
    assert summary.counts["succeeded"] == 6 and summary.run_dir.name.startswith("dataframe-")
    assert json.loads((summary.run_dir / "summary.json").read_text())["counts"] == summary.counts
    rows = ledger_query(summary.run_dir, "SELECT row_number, original FROM rows ORDER BY id")
    assert [r["row_number"] for r in rows] == [10, 11, 12, 13, 14, 15]
    assert json.loads(rows[0]["original"]) == [pairs[0][0], pairs[0][1], "A"]

    # The same content again (another object, plain str dtype) finds the same run: nothing is resent.
    again = capbatch.run_backfill(frame(pairs, index=range(10, 16)).assign(store=list("ABCDEF")),
                                  base_url=s.url, **fast)
    assert again.run_dir == summary.run_dir and again["this_invocation"]["requests"] == 0
    assert s.stats()["puts_per_card"] == {c: 1 for c, _ in pairs}


def test_a_numeric_key_column_is_refused_naming_the_column_and_nothing_is_sent(tmp_path, sim, fast):
    s = sim(cards={"4111": None})
    numeric_card = pd.DataFrame({"cardNumber": [4111, 4222], "cardExternalId": ["E1", "E2"]})
    with pytest.raises(capbatch.InputFileError) as err:
        capbatch.run_backfill(numeric_card, base_url=s.url, **fast)
    text = str(err.value)
    assert "'cardNumber' holds int64 values, not text" in text and "dtype=str" in text
    float_ext = pd.DataFrame({"card": ["0001", "0002"], "extId": [1.0, float("nan")]})
    with pytest.raises(capbatch.InputFileError, match="'extId' holds float64 values"):
        capbatch.validate_frame(float_ext)
    assert s.stats()["requests"] == 0


def test_missing_values_reject_their_rows_by_index_label(tmp_path, sim, fast):
    pairs = make_cards(3)
    s = sim(cards={c: None for c, _ in pairs})
    df = pd.DataFrame({"cardNumber": [pairs[0][0], None, pairs[1][0], float("nan"), pairs[2][0]],
                       "cardExternalId": [pairs[0][1], "EXTX", pd.NA, "EXTY", pairs[2][1]]},
                      index=[100, 101, 102, 103, 104], dtype=object)

    problems = capbatch.validate_frame(df)
    assert list(problems.index) == [101, 102, 103]
    assert list(problems["reason_code"]) == ["missing_card", "missing_external_id", "missing_card"]
    assert list(problems["column"]) == ["cardNumber", "cardExternalId", "cardNumber"]
    assert problems.attrs == {"rows": 5, "valid": 2, "rejected": 3, "duplicates": 0}
    assert df.drop(problems.index).index.tolist() == [100, 104]

    summary = capbatch.run_backfill(df, base_url=s.url, **fast)
    assert summary.exit_code == 1 and summary.counts["rejected"] == 3
    assert s.card_ids() == {pairs[0][0]: pairs[0][1], pairs[1][0]: None, pairs[2][0]: pairs[2][1]}
    failures = capbatch.load_failures(summary)
    assert failures["capbatch_row"].tolist() == [101, 102, 103]
    assert failures["capbatch_error_code"].tolist() == ["missing_card", "missing_external_id", "missing_card"]


def test_a_dataframe_meets_the_same_cell_rules_as_a_file(tmp_path, sim, fast):
    # One set of exactness rules: Excel error text, ="..." wrappers, TAB/NBSP trimming and
    # placeholders are judged the same in a DataFrame as in a CSV.
    s = sim(cards={"00123": None, "00456": None, "00789": None, "00999": None})
    df = pd.DataFrame({"cardNumber": ['="00123"', "00456", "\t00789\u00a0", "00999"],
                       "cardExternalId": ["EXT1", "#REF!", "EXT3", "N/A"]}, dtype="string")
    problems = capbatch.validate_frame(df)
    assert problems["reason_code"].tolist() == ["excel_error", "placeholder"]
    assert list(problems.index) == [1, 3]
    summary = capbatch.run_backfill(df, base_url=s.url, **fast)
    assert summary.exit_code == 1
    assert s.card_ids() == {"00123": "EXT1", "00456": None, "00789": "EXT3", "00999": None}


def test_an_index_that_is_not_row_numbers_is_kept_as_a_column(tmp_path, sim, fast):
    pairs = make_cards(2)
    s = sim(cards={c: None for c, _ in pairs})
    df = frame(pairs + [("0009", "N/A")], index=pd.Index(["cust-a", "cust-b", "cust-c"], name="customer"))
    problems = capbatch.validate_frame(df)
    assert problems.index.tolist() == ["cust-c"] and problems.index.name == "customer"
    assert problems["reason_code"].tolist() == ["placeholder"]
    summary = capbatch.run_backfill(df, base_url=s.url, **fast)
    results = capbatch.load_results(summary.run_dir)
    assert results["customer"].tolist() == ["cust-a", "cust-b", "cust-c"]
    assert results["capbatch_row"].tolist() == [0, 1, 2]      # by position, as df.iloc counts
    assert s.card_ids() == dict(pairs)


# ---- pairs and mappings in --------------------------------------------------------------------------------
def test_pairs_and_mappings_are_inputs_too(tmp_path, sim, fast):
    pairs = make_cards(4)
    s = sim(cards={c: None for c, _ in pairs})
    summary = capbatch.run_backfill((p for p in pairs[:2]), base_url=s.url, **fast)   # a generator
    assert summary.exit_code == 0 and summary.run_dir.name.startswith("records-")
    mappings = [{"card": pairs[2][0], "externalId": pairs[2][1], "note": "x"},
                {"card": pairs[3][0], "externalId": pairs[3][1]},
                {"card": 4111222233334444, "externalId": "EXTNUM"}]     # a number where text belongs
    summary = capbatch.run_backfill(mappings, base_url=s.url, **fast)
    assert summary.exit_code == 1
    assert s.card_ids() == dict(pairs)
    failed = capbatch.load_failures(summary.run_dir)
    assert failed["capbatch_row"].tolist() == [2] and failed["capbatch_error_code"].tolist() == ["not_text"]
    assert "is a int in the input, not text" in failed["capbatch_message"][0]
    assert capbatch.load_results(summary.run_dir)["note"].tolist() == ["x", "", ""]
    with pytest.raises(capbatch.UsageError, match="input item 1 is 'oops'"):
        capbatch.run_backfill([pairs[0], "oops"], base_url=s.url, **fast)
    with pytest.raises(capbatch.UsageError, match="pass d.items()"):
        capbatch.run_backfill(dict(pairs), base_url=s.url, **fast)


# ---- DataFrames out ---------------------------------------------------------------------------------------
def test_load_results_dtypes(tmp_path, sim, fast):
    pairs = make_cards(3)
    s = sim(cards={c: None for c, _ in pairs})
    summary = capbatch.run_backfill(pairs + [("0000000000000099", "N/A")], base_url=s.url, **fast)
    results = capbatch.load_results(summary.run_dir)
    text = pd.StringDtype()
    for column in ("cardNumber", "cardExternalId", "capbatch_card", "capbatch_sent_external_id",
                   "capbatch_previous_external_id", "capbatch_card_id", "capbatch_customer_id",
                   "capbatch_error_code", "capbatch_sheet"):
        assert results[column].dtype == text, column
    assert results["capbatch_state"].dtype == "category"
    assert list(results["capbatch_state"].cat.categories) == [
        "pending", "in_flight", "succeeded", "failed", "rejected", "unchanged", "duplicate"]
    assert results["capbatch_state"].tolist() == ["succeeded"] * 3 + ["rejected"]
    settled = results["capbatch_settled_at"]
    assert pd.api.types.is_datetime64_any_dtype(settled) and str(settled.dt.tz) == "UTC"
    assert settled[:3].notna().all() and pd.isna(settled[3])
    assert abs((pd.Timestamp.now(tz="UTC") - settled[0]).total_seconds()) < 120
    assert results["capbatch_card"].tolist()[:3] == [c for c, _ in pairs]        # zeros kept
    assert pd.isna(results["capbatch_sent_external_id"][3])                      # rejected: nothing sent
    assert str(results["capbatch_attempts"].dtype) == "Int64"
    with pytest.raises(capbatch.LedgerError):
        capbatch.load_results(tmp_path / "nowhere")


# ---- safe to embed ----------------------------------------------------------------------------------------
def test_unknown_keywords_and_bad_types_are_clear(tmp_path, sim, fast, run_cli):
    src = write_csv(tmp_path / "cards.csv", make_cards(2))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'concurency'; did you mean 'concurrency'\?"):
        capbatch.run_backfill(src, concurency=4)
    with pytest.raises(TypeError, match="did you mean 'base_url'"):
        capbatch.validate_frame(pd.DataFrame({"a": ["1"]}), baseurl="x")
    bad = [({"concurrency": 2.5}, capbatch.UsageError, "concurrency=2.5 is a float, not an int"),
           ({"rate": 1000}, capbatch.UsageError, "rate=1000 is an int, not"),
           ({"run_dir": 5}, capbatch.UsageError, "run_dir=5 is an int, not a path"),
           ({"strip_invisible": "maybe"}, capbatch.ConfigError, "strip_invisible = 'maybe' is not valid"),
           ({"timeout": "soon"}, capbatch.ConfigError, "timeout = 'soon' is not valid"),
           ({"env": "demo"}, capbatch.UsageError, "env is a str, not a mapping"),
           ({"sheet": "Sheet2", "source": make_cards(1)}, capbatch.UsageError, "sheet apply to files only")]
    for kwargs, error, message in bad:
        source = kwargs.pop("source", src)
        with pytest.raises(error, match=re.escape(message)):
            capbatch.run_backfill(source, base_url="http://127.0.0.1:9", **kwargs)
    for source in (42, b"cards.csv", None):
        with pytest.raises(capbatch.UsageError):
            capbatch.run_backfill(source, base_url="http://127.0.0.1:9", env=ENV)
    with pytest.raises(capbatch.UsageError, match="not a path"):
        capbatch.load_results(42)
    # A bad value gets the very message the CLI prints for it.
    with pytest.raises(capbatch.UsageError) as err:
        capbatch.run_backfill(src, base_url="http://127.0.0.1:9", concurrency=0, env=ENV)
    p = run_cli("run", src, "--base-url", "http://127.0.0.1:9", "--concurrency", "0")
    assert p.returncode == 2 and f"capbatch: {err.value}" in p.stderr


def test_a_host_sigterm_handler_is_kept_and_a_sigterm_during_the_run_stops_it(tmp_path, sim, fast):
    assert threading.current_thread() is threading.main_thread()
    pairs = make_cards(300)
    s = sim(cards={c: None for c, _ in pairs}, latency=0.01)
    host_calls: list[int] = []

    def host_handler(signum, frame):
        host_calls.append(signum)

    previous = signal.signal(signal.SIGTERM, host_handler)
    try:
        summary = capbatch.run_backfill(pairs[:5], base_url=s.url, **fast)
        assert summary.exit_code == 0
        assert signal.getsignal(signal.SIGTERM) is host_handler

        def terminate_when_busy():
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if s.stats()["requests"] >= 60:
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=terminate_when_busy, daemon=True)
        killer.start()
        with pytest.raises(capbatch.Interrupted):
            capbatch.run_backfill(pairs, base_url=s.url, **{**fast, "rate": "200/s"}, concurrency=4, grace_period=5)
        killer.join(5)
        assert signal.getsignal(signal.SIGTERM) is host_handler and host_calls == []
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        done = capbatch.run_backfill(pairs, base_url=s.url, **fast)          # the same data resumes
        assert done.exit_code == 0 and done["invocations"] == 2
        assert s.card_ids() == dict(pairs) and max(s.stats()["puts_per_card"].values()) <= 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_library_leaves_the_root_logger_alone(tmp_path, sim, fast, caplog):
    pairs = make_cards(2)
    s = sim(cards={c: None for c, _ in pairs})
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    with caplog.at_level(logging.INFO, logger="capbatch"):
        capbatch.run_backfill(pairs, base_url=s.url, **fast)
    assert (list(root.handlers), root.level) == before
    assert {r.name.split(".")[0] for r in caplog.records} == {"capbatch"}
    assert any("done: 2 succeeded" in r.getMessage() for r in caplog.records)


# ---- where an event loop is already running ------------------------------------------------------------------
def test_inside_a_running_event_loop_sync_and_async(tmp_path, sim, fast):
    pairs = make_cards(40)
    s = sim(cards={c: None for c, _ in pairs}, latency=0.02)

    async def host():
        sync = capbatch.run_backfill(pairs[:10], base_url=s.url, **fast)      # as a notebook cell would
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(ticker())
        summary = await capbatch.run_backfill_async(pairs[10:], base_url=s.url, concurrency=2, **fast)
        beat.cancel()
        return sync, summary, ticks

    sync, summary, ticks = asyncio.run(host())
    assert sync.exit_code == 0 and summary.exit_code == 0
    assert ticks >= 10                      # the caller's loop kept running while the rows were sent
    assert s.card_ids() == dict(pairs)


def test_ctrl_c_in_a_notebook_stops_the_run_gracefully(tmp_path, sim, fast):
    """ipykernel turns "interrupt kernel" into KeyboardInterrupt in the main thread, whose loop is
    running the cell: the rows are then being sent on capbatch's own thread, which must stop too."""
    import _thread

    pairs = make_cards(200)
    s = sim(cards={c: None for c, _ in pairs}, latency=0.01)

    def like_ipykernel(signum, frame):
        raise KeyboardInterrupt

    def interrupt_when_busy():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if s.stats()["requests"] >= 30:
                _thread.interrupt_main()
                return
            time.sleep(0.01)

    async def cell():
        threading.Thread(target=interrupt_when_busy, daemon=True).start()
        return capbatch.run_backfill(pairs, base_url=s.url, **{**fast, "rate": "100/s"}, concurrency=4)

    previous = signal.signal(signal.SIGINT, like_ipykernel)
    try:
        with pytest.raises(capbatch.Interrupted):
            asyncio.run(cell())
        assert signal.getsignal(signal.SIGINT) is like_ipykernel
    finally:
        signal.signal(signal.SIGINT, previous)
    run_dir = next((tmp_path / "reports").iterdir())
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["stop"] == "interrupted" and 0 < stopped["counts"]["succeeded"] < len(pairs)
    assert capbatch.run_backfill(pairs, base_url=s.url, **fast).exit_code == 0
    assert s.card_ids() == dict(pairs)


async def test_cancelling_the_async_run_stops_it_and_it_resumes(tmp_path, sim, fast):
    pairs = make_cards(200)
    s = sim(cards={c: None for c, _ in pairs}, latency=0.01)
    task = asyncio.create_task(capbatch.run_backfill_async(pairs, base_url=s.url, concurrency=4,
                                                           **{**fast, "rate": "100/s"}))
    while s.stats()["requests"] < 30:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    sent = s.stats()["requests"]
    assert sent < len(pairs)
    summary = await capbatch.run_backfill_async(pairs, base_url=s.url, **fast)
    assert summary.exit_code == 0 and s.card_ids() == dict(pairs)
    assert max(s.stats()["puts_per_card"].values()) <= 2


# ---- the README's recipes ------------------------------------------------------------------------------------
def _readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use from code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def _stub_orchestrators(monkeypatch) -> None:
    """Just enough of airflow.decorators and dagster for the recipes to define their functions."""

    def task(fn=None, **options):
        return fn if fn is not None else (lambda f: f)

    airflow, decorators = types.ModuleType("airflow"), types.ModuleType("airflow.decorators")
    decorators.task = task
    airflow.decorators = decorators

    class AssetExecutionContext:
        def __init__(self):
            self.metadata = {}

        def add_output_metadata(self, metadata):
            self.metadata.update(metadata)

    dagster = types.ModuleType("dagster")
    dagster.asset = task
    dagster.AssetExecutionContext = AssetExecutionContext
    for name, module in (("airflow", airflow), ("airflow.decorators", decorators), ("dagster", dagster)):
        monkeypatch.setitem(sys.modules, name, module)


def test_the_readme_recipes_run(tmp_path, sim, monkeypatch):
    import openpyxl

    blocks = _readme_blocks()
    assert len(blocks) == 4, "the README's 'Use from code' section changed: update this test"
    pairs = make_cards(8)
    s = sim(cards={c: None for c, _ in pairs})
    for name in list(os.environ):
        if name.startswith(("CAPBATCH_", "CAPILLARY_")):
            monkeypatch.delenv(name)
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CAPBATCH_PROGRESS", "none")
    monkeypatch.chdir(tmp_path)
    _stub_orchestrators(monkeypatch)
    book = openpyxl.Workbook()
    book.active.append(["cardNumber", "cardExternalId"])
    for card, ext in pairs[:4]:
        book.active.append([card, ext])
    book.active.append(["0000000000000077", None])          # dropped by the notebook's cleaning
    book.active.append(["0000000000000078", "N/A"])         # dropped via validate_frame's problems
    book.save(tmp_path / "cards.xlsx")
    write_csv(tmp_path / "export.csv", pairs[4:])

    def runnable(code: str) -> str:
        assert code.count('cluster="eu"') == 1, code
        return code.replace('cluster="eu"', f'base_url="{s.url}"')

    quick, notebook, airflow_task, dagster_asset = (runnable(b) for b in blocks)
    exec(compile(quick, "README.md", "exec"), {})
    assert s.card_ids() == {**dict(pairs[:4]), **{c: None for c, _ in pairs[4:]}}

    ns: dict = {}

    async def in_a_notebook():                        # Jupyter runs cells inside its event loop
        exec(compile(notebook, "README.md", "exec"), ns)

    asyncio.run(in_a_notebook())
    assert ns["problems"].index.tolist() == [5] and ns["summary"].exit_code == 0
    assert ns["failures"].empty

    ns = {}
    exec(compile(airflow_task, "README.md", "exec"), ns)
    pushed = ns["backfill_card_ids"](str(tmp_path / "export.csv"))
    assert json.loads(json.dumps(pushed))["counts"]["succeeded"] == 4
    assert s.card_ids() == dict(pairs)

    ns = {}
    exec(compile(dagster_asset, "README.md", "exec"), ns)
    context = sys.modules["dagster"].AssetExecutionContext()
    results = ns["card_external_ids"](context, frame(pairs[:2]))
    assert context.metadata["exit_code"] == 0 and context.metadata["unchanged"] + context.metadata["succeeded"] == 2
    assert results["capbatch_card"].tolist() == [c for c, _ in pairs[:2]]


# ---- start-up cost -----------------------------------------------------------------------------------------
def test_neither_import_capbatch_nor_the_cli_loads_pandas():
    code = ("import sys, capbatch, capbatch.cli; "
            "print(sorted(m for m in ('pandas', 'numpy', 'aiohttp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    assert out.stdout.strip() == "[]"
