import os

from host_node.function_logs import rotate_oversized, tail


def test_a_log_over_its_limit_moves_aside_and_its_writer_carries_on(tmp_path) -> None:
    chatty, quiet = tmp_path / "acme" / "chatty.log", tmp_path / "acme" / "quiet.log"
    chatty.parent.mkdir()
    (tmp_path / "acme" / "chatty.log.1").write_bytes(b"the oldest, dropped\n")
    quiet.write_bytes(b"q" * 100)
    writer = os.open(chatty, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # as an instance holds it
    try:
        os.write(writer, b"x" * 60 + b"\n" + b"y" * 89 + b"\n")  # 151 bytes
        rotated = rotate_oversized(tmp_path, max_bytes=100)
        os.write(writer, b"after\n")
    finally:
        os.close(writer)

    assert rotated == [chatty]
    # the last 100 bytes, from the first whole line in them
    assert (tmp_path / "acme" / "chatty.log.1").read_bytes() == b"y" * 89 + b"\n"
    assert chatty.read_bytes() == b"after\n", "appended at the emptied log's start, no hole"
    assert quiet.read_bytes() == b"q" * 100 and not (tmp_path / "acme" / "quiet.log.1").exists()
    assert sorted(p.name for p in chatty.parent.iterdir()) == ["chatty.log", "chatty.log.1", "quiet.log"]


def test_the_tail_reaches_into_the_rotated_log_when_the_current_one_is_short(tmp_path) -> None:
    log = tmp_path / "f.log"
    log.with_name("f.log.1").write_bytes(b"one\ntwo\nthree\n")
    log.write_bytes(b"four\nfive\n")

    assert tail(log, 3) == (["three", "four", "five"], True)
    assert tail(log, 10) == (["one", "two", "three", "four", "five"], False)
    assert tail(tmp_path / "never.log", 10) == ([], False)


def test_the_tail_is_bounded_in_bytes_and_drops_a_cut_line(tmp_path) -> None:
    log = tmp_path / "f.log"
    log.write_bytes(b"a" * 50 + b"\n" + b"bb\ncc\n")

    assert tail(log, 10, max_bytes=8) == (["bb", "cc"], True)  # "aa\n" was the end of a line
