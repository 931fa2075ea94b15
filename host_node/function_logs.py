"""Functions' logs on a host node: `<logs>/<tenant>/<function>.log`, kept to a bounded size,
and their last lines for `hetfaas logs`.

A python instance's stdout and stderr are the log file itself, opened for appending, so the
node cannot rotate it by renaming: the instance would go on writing into the renamed file.
Instead a log past its limit is copied to `<function>.log.1` (the one before dropped) and
emptied in place (logrotate's copytruncate); appending writers carry on at its new end. Lines
written between the copy and the truncation are lost. A function's logs take at most about twice
the limit on each node, plus what it writes between two checks. A follower (`logs -f`) whose
position is from before the last rotation reads the rest of the copy, then the new log.
"""

import asyncio
import logging
import os
import time
from pathlib import Path

from host_node.log_clock import LogClock
from schemas.manifest import NAME_RE

log = logging.getLogger(__name__)

CHECK_S = 2.0  # how often function logs are checked against their size limit


def log_of(logs_dir: Path, tenant: str, function: str) -> Path:
    """Where a function's stdout and stderr go on this node. The names come off the wire: anyone
    who can publish to the node's subjects could send "../", so they are checked (ValueError)."""
    if not (NAME_RE.match(tenant) and NAME_RE.match(function)):
        raise ValueError(f"invalid tenant or function name {tenant!r}/{function!r}")
    return logs_dir / tenant / f"{function}.log"


def rotate_oversized(logs_dir: Path, max_bytes: int, clock: LogClock | None = None) -> list[Path]:
    """Rotate every function log in `logs_dir` over `max_bytes`; the logs rotated. A log that
    cannot be rotated (a full disk) is logged and left for the next check. The clock notes each
    log's size now, and its rotations."""
    rotated = []
    now, present = time.time(), set[Path]()
    for path in logs_dir.glob("*/*.log"):
        try:
            size = path.stat().st_size
            present.add(path)
            if clock is not None:
                clock.observe(path, size, now)
            if size > max_bytes:
                copied_from = rotate(path, max_bytes)
                rotated.append(path)
                if clock is not None:
                    clock.rotated(path, copied_from)
        except FileNotFoundError:
            continue  # gone meanwhile
        except OSError as exc:
            log.warning("could not rotate %s: %s", path, exc)
    if clock is not None:
        clock.forget_except(present)
    return rotated


def rotate(path: Path, max_bytes: int) -> int:
    """Keep the log's last `max_bytes` (from the first whole line in them) as `<name>.1`, then
    empty it: however large it grew between checks, the copy stays within the limit. Returns
    the offset in the log where the copy starts (where a follower's position lands in it)."""
    older = path.with_name(path.name + ".1")
    partial = path.with_name(path.name + ".1.partial")
    kept, size = _end_of(path, max_bytes)
    if size > max_bytes:
        kept = kept[kept.find(b"\n") + 1 :]  # from the first whole line (none: nothing kept)
    partial.write_bytes(kept)
    os.replace(partial, older)  # a reader never sees half a copy
    os.truncate(path, 0)
    return size - len(kept)  # the copy is the log's bytes from here to the size read


MAX_TAIL_BYTES = 1 << 20  # of output one node sends back for `hetfaas logs`


def tail(path: Path, lines: int, max_bytes: int = MAX_TAIL_BYTES) -> tuple[list[str], bool]:
    """The last `lines` lines of a function's output, from its log and, when that holds too
    few, the rotated one before it: (lines, oldest first; whether earlier ones exist)."""
    newer, newer_size = _end_of(path, max_bytes)
    older, older_cut, newer_cut = b"", False, newer_size > max_bytes
    if not newer_cut:
        limit = max_bytes - len(newer)
        older, older_size = _end_of(path.with_name(path.name + ".1"), limit)
        older_cut = older_size > limit
    found = (older + newer).decode(errors="replace").splitlines()
    cut = newer_cut or older_cut
    if cut:
        found = found[1:]  # it may start inside a line
    return found[-lines:] if lines else [], cut or len(found) > lines


def read_from(
    path: Path, offset: int, lines: int, max_bytes: int = MAX_TAIL_BYTES
) -> tuple[list[str], bool, int]:
    """The whole lines written from `offset` on, the last `lines` of them: (lines, whether earlier
    ones were left out, the offset to read from next: past the last whole line). An offset past
    the end (the log was emptied since) reads from its start."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            start = offset if 0 <= offset <= size else 0
            start = max(start, size - max_bytes)
            file.seek(start)
            data = file.read(size - start)
    except FileNotFoundError:
        return [], False, 0
    whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for its end
    found = whole.decode(errors="replace").splitlines()
    cut = start > offset >= 0 and start > 0
    if cut and found:
        found = found[1:]  # it may start inside a line
    return found[-lines:], cut or len(found) > lines, start + len(whole)


def read_on(
    path: Path, clock: LogClock, generation: int, offset: int, lines: int
) -> tuple[list[str], bool, int]:
    """A follower's next read from its position (`generation`, `offset`): on in the same log, on
    across one rotation, or, two or more behind, the log from its start with the earlier lines
    said to be left out (their copy is gone)."""
    if generation == clock.generation(path):
        return read_from(path, offset, lines)
    in_copy = clock.in_copy(path, generation, offset)
    if in_copy is not None:
        return read_across_rotation(path, in_copy, lines)
    found, _, end = read_from(path, 0, lines)
    return found, True, end


def read_across_rotation(
    path: Path, offset_in_copy: int, lines: int, max_bytes: int = MAX_TAIL_BYTES
) -> tuple[list[str], bool, int]:
    """`read_from` for a follower whose position is from before the last rotation: the rest of
    the rotated copy from `offset_in_copy` (negative: the copy starts past it, and what lay
    between was dropped), then the log from its start. Returns what `read_from` does, the end
    being the log's."""
    copy = path.with_name(path.name + ".1")
    older: list[str] = []
    older_cut = offset_in_copy < 0
    if offset_in_copy < size_of(copy):  # a position at or past the copy's end has it all
        older, cut, _ = read_from(copy, max(0, offset_in_copy), lines, max_bytes)
        older_cut = older_cut or cut
    newer, newer_cut, end = read_from(path, 0, lines, max_bytes)
    found = older + newer
    return found[-lines:], older_cut or newer_cut or len(found) > lines, end


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _end_of(path: Path, max_bytes: int) -> tuple[bytes, int]:
    """The file's last `max_bytes` bytes, up to its size when read, and that size."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - max_bytes))
            return file.read(min(size, max_bytes)), size
    except FileNotFoundError:
        return b"", 0


async def keep_bounded(logs_dir: Path, max_bytes: int, clock: LogClock | None = None) -> None:
    """Rotate function logs past `max_bytes` every CHECK_S, off the event loop."""
    while True:
        await asyncio.sleep(CHECK_S)
        for path in await asyncio.to_thread(rotate_oversized, logs_dir, max_bytes, clock):
            log.info("rotated %s (over %d bytes)", path, max_bytes)
