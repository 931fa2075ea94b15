"""How a batch of answers is split to stay under NATS's max_payload: pure."""

from fabric.bus import split_by_size


def test_a_batch_is_split_by_size_and_keeps_every_answer_once() -> None:
    bodies = [b"x" * 100] * 25
    ranges = split_by_size(bodies, 1000)
    assert ranges == [(0, 10), (10, 20), (20, 25)]
    assert [i for start, end in ranges for i in range(start, end)] == list(range(25))


def test_an_answer_larger_than_the_limit_goes_in_a_range_of_its_own() -> None:
    assert split_by_size([b"a", b"b" * 50, b"c"], 10) == [(0, 1), (1, 2), (2, 3)]
    assert split_by_size([], 10) == []
