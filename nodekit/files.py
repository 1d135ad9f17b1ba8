"""Small file helpers with the crash-safety every writer in netagent needs."""

from __future__ import annotations

import contextlib
import os
import tempfile


def atomic_write(path: str, data: str | bytes, mode: int = 0o644) -> None:
    """Write a file so readers see either the old or the new content, never a mix.

    Temp file in the same directory + fsync + rename: a crash at any instant leaves one of the two.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
