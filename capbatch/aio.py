"""Running a coroutine to completion from synchronous code, notebooks included."""

from __future__ import annotations

import asyncio
from typing import Any, Callable


def run_async(coro: Any, on_interrupt: Callable[[str], None] | None = None) -> Any:
    """Run a coroutine to completion from synchronous code — also where this thread already runs an
    event loop (a notebook, an async framework): then on a thread of its own, and a Ctrl-C that lands
    here calls ``on_interrupt`` (the run's stop switch) instead of leaving the run behind.
    ``coro`` may be a coroutine or a function making one."""
    make = coro if callable(coro) else (lambda: coro)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="capbatch-run") as pool:
        future = pool.submit(lambda: asyncio.run(make()))
        while True:
            try:
                # Short waits: a signal that lands on another thread only raises KeyboardInterrupt here
                # once this thread runs Python code again.
                if concurrent.futures.wait([future], timeout=0.2).done:
                    return future.result()
            except KeyboardInterrupt:
                if on_interrupt is None:
                    raise
                on_interrupt("Ctrl-C")
