"""Functions' logs on a host node: `<logs>/<tenant>/<function>.log`, kept to a bounded size.

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
