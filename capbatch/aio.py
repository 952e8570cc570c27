"""Running a coroutine to completion from synchronous code, notebooks included."""

from __future__ import annotations

import asyncio
from typing import Any


def run_async(coro: Any) -> Any:
    """asyncio.run, also from code that already has a running loop (a notebook): then on a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="capbatch-run") as pool:
        return pool.submit(asyncio.run, coro).result()
