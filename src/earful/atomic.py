"""Writing files so that a reader (or a crash) never sees half of one: temp file + rename.

The temporary file sits beside the target (same filesystem, so the rename is atomic) under a
unique name, and is removed if the write fails. The file ends up with the permissions `open()`
would have given it: an existing file keeps its mode, a new one gets 0666 less the umask
(mkstemp alone makes every file 0600, unreadable to the group a shared data folder is for).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, without changing it where the kernel reports it (Linux >= 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere the only way to read it is to set it and set it back; the lock keeps two of our
    # threads from interleaving that.
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextmanager
def replacing(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A file to write `path` through: a temporary beside it, renamed over it when the block ends
    without an error, removed otherwise. `mode` is "wb" or "w" (then `encoding`, default UTF-8)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding or "utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with replacing(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """A JSON report (figures at the top level), readable by people: indented, non-ASCII kept."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
