"""`hetfaas logs --since` and `-f` on a node (host_node/log_clock.py, function_logs.read_from):
where a log stood at a time, and reading on from a position across a rotation."""

from pathlib import Path

from host_node.function_logs import read_from, read_on, rotate_oversized
from host_node.log_clock import LogClock


def test_the_offset_a_log_had_at_a_time(tmp_path: Path) -> None:
    log = tmp_path / "f.log"
    clock = LogClock(keep=3)
    for at, size in [(10.0, 0), (12.0, 5), (14.0, 5), (16.0, 9), (18.0, 20)]:
        clock.observe(log, size, at)

    assert clock.offset_at(log, 17.0) == 9 and clock.offset_at(log, 18.5) == 20
    assert clock.offset_at(log, 11.0) == 0, "older than the marks kept: from the start"
    assert clock.offset_at(tmp_path / "other.log", 17.0) == 0


def test_reading_on_from_a_position(tmp_path: Path) -> None:
    log = tmp_path / "f.log"
    log.write_bytes(b"one\ntwo\nthr")
    lines, cut, end = read_from(log, 0, 100)
    assert (lines, cut, end) == (["one", "two"], False, 8), "a line still being written waits"
    with log.open("ab") as f:
        f.write(b"ee\nfour\n")
    assert read_from(log, end, 100) == (["three", "four"], False, 19)
    assert read_from(log, 19, 100) == ([], False, 19)
    assert read_from(log, 500, 100)[0] == ["one", "two", "three", "four"], "emptied since: from the start"


def test_a_rotation_starts_a_new_generation(tmp_path: Path) -> None:
    log = tmp_path / "acme" / "f.log"
    log.parent.mkdir()
    log.write_bytes(b"x" * 150 + b"\n")
    clock = LogClock()
    assert clock.generation(log) == 0
    rotate_oversized(tmp_path, max_bytes=100, clock=clock)
    assert clock.generation(log) == 1 and log.stat().st_size == 0
    log.unlink()
    rotate_oversized(tmp_path, max_bytes=100, clock=clock)
    assert clock.generation(log) == 0, "a log gone from disk is forgotten"


def new_log(root: Path) -> Path:
    log = root / "acme" / "f.log"
    log.parent.mkdir()
    return log


def follower_read(
    log: Path, clock: LogClock, position: tuple[int, int]
) -> tuple[list[str], bool, tuple[int, int]]:
    """What the node answers a follower (`logs -f`) at `position`, and its next position."""
    generation = clock.generation(log)
    lines, cut, end = read_on(log, clock, *position, 1000)
    return lines, cut, (generation, end)


def test_a_follower_reads_on_across_a_rotation_and_loses_nothing(tmp_path: Path) -> None:
    log, clock = new_log(tmp_path), LogClock()
    log.write_bytes(b"one\ntwo\n")
    first, _, position = follower_read(log, clock, (0, 0))
    with log.open("ab") as f:
        f.write(b"three\nfour\n")  # written after the follower's read, before the rotation
    rotate_oversized(tmp_path, max_bytes=16, clock=clock)  # the copy holds what was not read
    with log.open("ab") as f:
        f.write(b"five\n")
    second, cut, position = follower_read(log, clock, position)
    third, _, _ = follower_read(log, clock, position)

    assert first == ["one", "two"]
    assert (second, cut) == (["three", "four", "five"], False), "the copy's rest, then the new log"
    assert third == [], "each line once"


def test_a_follower_is_told_when_lines_went_before_it_read_them(tmp_path: Path) -> None:
    log, clock = new_log(tmp_path), LogClock()
    log.write_bytes(b"one\n")
    _, _, position = follower_read(log, clock, (0, 0))
    log.write_bytes(b"one\n" + b"".join(b"line %d\n" % n for n in range(20)))
    rotate_oversized(tmp_path, max_bytes=30, clock=clock)  # the copy keeps the last 30 bytes only
    lines, cut, _ = follower_read(log, clock, position)
    assert cut and lines == ["line 17", "line 18", "line 19"], "what the copy kept, whole lines only"

    _, _, position = follower_read(log, clock, (0, 0))
    for _ in range(2):  # two rotations behind: the first copy is gone
        log.write_bytes(b"x" * 40 + b"\n")
        rotate_oversized(tmp_path, max_bytes=30, clock=clock)
    log.write_bytes(b"now\n")
    lines, cut, _ = follower_read(log, clock, position)
    assert (lines, cut) == (["now"], True)
