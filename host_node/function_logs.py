"""Functions' logs on a host node: `<logs>/<tenant>/<function>.log`, kept to a bounded size,
and their last lines for `hetfaas logs`.

A python instance's stdout and stderr are the log file itself, opened for appending, so the
node cannot rotate it by renaming: the instance would go on writing into the renamed file.
Instead a log past its limit is copied to `<function>.log.1` (the one before dropped) and
emptied in place (logrotate's copytruncate); appending writers carry on at its new end. A line
written between the copy and the truncation is lost. A function's logs take at most about twice
the limit on each node, plus what it writes between two checks.
"""

import os
import shutil
from pathlib import Path


def rotate_oversized(logs_dir: Path, max_bytes: int) -> list[Path]:
    """Rotate every function log in `logs_dir` over `max_bytes`; the logs rotated."""
    rotated = []
    for log in logs_dir.glob("*/*.log"):
        try:
            if log.stat().st_size > max_bytes:
                rotate(log)
                rotated.append(log)
        except FileNotFoundError:
            continue  # gone meanwhile
    return rotated


def rotate(log: Path) -> None:
    older = log.with_name(log.name + ".1")
    partial = log.with_name(log.name + ".1.partial")
    with open(log, "rb") as source, open(partial, "wb") as copy:
        shutil.copyfileobj(source, copy)
    os.replace(partial, older)  # a reader never sees half a copy
    os.truncate(log, 0)


MAX_TAIL_BYTES = 1 << 20  # of output one node sends back for `hetfaas logs`


def tail(log: Path, lines: int, max_bytes: int = MAX_TAIL_BYTES) -> tuple[list[str], bool]:
    """The last `lines` lines of a function's output, from its log and, when that holds too
    few, the rotated one before it: (lines, oldest first; whether earlier ones exist)."""
    newer, newer_cut = _end_of(log, max_bytes)
    older, older_cut = b"", False
    if not newer_cut:
        older, older_cut = _end_of(log.with_name(log.name + ".1"), max_bytes - len(newer))
    found = (older + newer).decode(errors="replace").splitlines()
    cut = newer_cut or older_cut
    if cut:
        found = found[1:]  # it may start inside a line
    return found[-lines:] if lines else [], cut or len(found) > lines


def _end_of(path: Path, max_bytes: int) -> tuple[bytes, bool]:
    """The file's last `max_bytes` bytes, and whether it holds more."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - max_bytes))
            return file.read(max_bytes), size > max_bytes
    except FileNotFoundError:
        return b"", False
