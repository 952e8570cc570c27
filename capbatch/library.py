"""capbatch from code: the functions ``import capbatch`` offers, safe to embed in a host process.

Settings are keywords named like the CLI's long options (``base_url``, ``rate``, ``concurrency``...);
a misspelt one is a ``TypeError`` naming the closest valid setting, a wrong type or value a
:class:`~capbatch.errors.CapbatchError` with the CLI's message. Nothing here exits the process,
configures logging (records go to the ``capbatch.*`` loggers) or keeps a signal handler once it
returns. Everything runs through the same pipeline as the CLI (:mod:`capbatch.runner`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import config
from .errors import UsageError
from .summary import Summary

# Not settings: the input is the first argument, credentials come only from the environment.
_NOT_KEYWORDS = frozenset({"input", "credentials", "sources"})
_FILE_ONLY = ("delimiter", "encoding", "sheet", "header_row")


def setting_names() -> list[str]:
    """Every keyword ``run_backfill`` accepts besides ``config_file`` and ``env``."""
    return [f.name for f in dataclasses.fields(config.Settings) if f.name not in _NOT_KEYWORDS]


def settings_for(call: str, source: Any, keywords: Mapping[str, Any], config_file: Any = None,
                 env: Mapping[str, str] | None = None) -> config.Settings:
    """Check ``keywords`` (names, then types) and resolve them as the CLI resolves its flags:
    keywords > environment (CAPBATCH_*) > TOML file > defaults."""
    names = setting_names()
    for key in keywords:
        if key not in names:
            close = difflib.get_close_matches(key, names + ["config_file", "env"], n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"valid settings: {', '.join(sorted(names))}"
            raise TypeError(f"{call}() got an unexpected keyword argument {key!r}; {hint}")
    if config_file is not None and not isinstance(config_file, (str, os.PathLike)):
        raise UsageError(f"config_file is a {type(config_file).__name__}, not a path", "pass the TOML file's path")
    if env is not None and not isinstance(env, Mapping):
        raise UsageError(f"env is a {type(env).__name__}, not a mapping",
                         "pass a dict of environment variables (default: os.environ)")
    flags: dict[str, Any] = {}
    for key, value in keywords.items():
        if value is None:
            continue
        _check_type(key, value)
        flags[key] = Path(value) if isinstance(value, os.PathLike) else value
    if isinstance(source, (str, os.PathLike)):
        flags["input"] = Path(source)
    elif source is not None and any(k in flags for k in _FILE_ONLY):
        from .source.frame import is_dataframe

        given = ", ".join(k for k in _FILE_ONLY if k in flags)
        raise UsageError(f"{given} apply to files only, not to "
                         f"{'a DataFrame' if is_dataframe(source) else 'in-memory records'}", f"drop {given}")
    return config.resolve(flags, os.environ if env is None else env,
                          Path(config_file) if config_file is not None else None)


@functools.cache
def _accepted(key: str) -> tuple[type, ...] | None:
    """The Python types a setting accepts from code (None: unchecked). Read from Settings' annotations,
    so settings added later are checked too. Text is parsed by config.resolve like a flag."""
    hint: Any = next(f.type for f in dataclasses.fields(config.Settings) if f.name == key)
    if isinstance(hint, str):
        try:
            hint = eval(hint, vars(config))
        except Exception:  # noqa: BLE001 - an annotation we cannot evaluate is left unchecked
            return None
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    accepted: list[type] = []
    for member in members:
        origin = typing.get_origin(member) or member
        if member is type(None):
            continue
        if not isinstance(origin, type):
            return None
        accepted.append(origin)
        if origin is float:
            accepted.append(int)
        elif origin is Path:
            accepted += [str, os.PathLike]
        elif origin in (tuple, list):
            accepted += [tuple, list]
        elif origin is config.Rate:
            accepted.append(str)
    return tuple(accepted)


def _check_type(key: str, value: Any) -> None:
    if isinstance(value, str) and key in config.SETTABLE:
        return  # parsed (and its value checked) by config.resolve, exactly like the CLI's flag
    accepted = _accepted(key)
    if accepted is None:
        return
    if isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted):
        return
    wanted = " or ".join(sorted({"a path" if t in (Path, os.PathLike) else
                                 "a rate like '1000/min'" if t is config.Rate else
                                 f"{'an' if t.__name__[0] in 'aeiou' else 'a'} {t.__name__}" for t in accepted}))
    raise UsageError(f"{key}={value!r} is {_a(value)}, not {wanted}", f"pass {key} as {wanted}")


def _a(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


# ---- running ----------------------------------------------------------------------------------------
def run_backfill(source: Any, *, config_file: Any = None, env: Mapping[str, str] | None = None,
                 **settings: Any) -> Summary | dict[str, Any]:
    """Run (or resume) a backfill of ``source`` and return its :class:`~capbatch.summary.Summary`.

    ``source`` is a CSV/Excel path, a ``pandas.DataFrame`` (text columns; see README "Use from code"),
    or an iterable of ``(card, external_id)`` pairs or of mappings. ``settings`` are the CLI's long
    options with underscores; credentials come from ``env`` (default ``os.environ``). The same content
    finds the same run directory again, so calling again resumes. Rows that failed or were rejected
    are not an exception: ``summary.exit_code`` is 1. An aborted run raises :class:`RunAborted`, a
    stopped one (Ctrl-C, SIGTERM) :class:`Interrupted`; both are resumable. With ``dry_run=True``
    nothing is sent and the result is :func:`validate_file`'s counts.

    Works where an event loop is already running (a notebook): the requests then run on a thread of
    their own. From a coroutine, prefer :func:`run_backfill_async`, which does not block the loop.
    """
    from . import runner

    s = settings_for("run_backfill", source, settings, config_file, env)
    return runner.run(s, None if isinstance(source, (str, os.PathLike)) else source)


async def run_backfill_async(source: Any, *, config_file: Any = None, env: Mapping[str, str] | None = None,
                             **settings: Any) -> Summary | dict[str, Any]:
    """:func:`run_backfill` for async code: the run goes to a worker thread, so the caller's event loop
    stays free. Cancelling the awaiting task stops the run like SIGTERM (requests in flight finish
    within the grace period; a second cancel cuts them off), then re-raises ``CancelledError``; rerun
    to resume."""
    import asyncio

    from . import runner

    s = settings_for("run_backfill_async", source, settings, config_file, env)
    switch = runner.StopSwitch()
    call = functools.partial(runner.run, s, None if isinstance(source, (str, os.PathLike)) else source,
                             stop=switch)
    future = asyncio.get_running_loop().run_in_executor(None, call)
    cancelled = False
    while True:
        try:
            summary = await asyncio.shield(future)
            break
        except asyncio.CancelledError:
            if future.done():
                if cancelled:
                    raise
                summary = future.result()   # finished just as we were cancelled: keep the result
                break
            cancelled = True
            switch.press("task cancelled")
        except BaseException:
            if cancelled:
                raise asyncio.CancelledError() from None   # the run stopped because we were cancelled
            raise
    if cancelled:
        raise asyncio.CancelledError()
    return summary


# ---- validating ---------------------------------------------------------------------------------------
def validate_file(source: Any, *, config_file: Any = None, env: Mapping[str, str] | None = None,
                  **settings: Any) -> dict[str, Any]:
    """Check ``source`` without any network: counts (``rows``, ``valid``, ``rejected``, ``duplicates``,
    ``by_reason``), the first problems, ``exit_code`` (0/1), and a validation CSV under ``reports_dir``."""
    from . import runner

    s = settings_for("validate_file", source, settings, config_file, env)
    return runner.validate(s, source=None if isinstance(source, (str, os.PathLike)) else source)


def validate_frame(df: Any, *, config_file: Any = None, env: Mapping[str, str] | None = None,
                   **settings: Any) -> Any:
    """The problems of a DataFrame as a DataFrame, one row per rejected or duplicate input row, indexed
    by ``df``'s own labels: ``column`` (the column at fault), ``value``, ``reason_code``, ``reason``.
    ``df.drop(problems.index)`` keeps the rows that would be sent. Counts are in ``problems.attrs``
    (``rows``, ``valid``, ``rejected``, ``duplicates``). No network, no files written."""
    import tempfile

    from . import runner
    from .source.frame import is_dataframe
    from .results import problems_frame

    if not is_dataframe(df):
        raise UsageError(f"validate_frame needs a pandas.DataFrame, not {_a(df)}",
                         "for a file use validate_file(path)")
    s = settings_for("validate_frame", df, settings, config_file, env)
    with tempfile.TemporaryDirectory(prefix="capbatch-validate-") as tmp:
        prepared = runner.prepare(s, run_dir=Path(tmp), source=df)
        try:
            labels = df.index if getattr(prepared.table, "numbered_by_position", False) else None
            problems = problems_frame(prepared.ledger, labels, df.index.name)
            counts = runner.validation_report(prepared.ledger)
        finally:
            prepared.ledger.close()
    problems.attrs.update({k: counts[k] for k in ("rows", "valid", "rejected", "duplicates")})
    return problems


__all__ = [
    "Summary",
    "run_backfill",
    "run_backfill_async",
    "setting_names",
    "settings_for",
    "validate_file",
    "validate_frame",
]
