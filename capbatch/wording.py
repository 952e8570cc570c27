"""Small helpers for messages people read: counts with the right singular or plural."""

from __future__ import annotations


def plural(n: int | None, word: str, plural_form: str | None = None) -> str:
    """``plural(1, "row")`` -> "1 row"; ``plural(3, "row")`` -> "3 rows"."""
    n = n or 0
    return f"{n} {word if n == 1 else (plural_form or word + 's')}"
