"""Output locations checked before anything is read or sent: an unwritable one is a usage error
(exit 2) that names the flag to change."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UsageError


def check_dir(path: Path, flag: str) -> None:
    """``path`` is (or can be made) a directory this process can create files in."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".capbatch-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} {path} is not a writable directory ({exc.strerror or exc})",
                         f"make it writable or choose another place with {flag}") from exc
