"""Sandbox host ids (host_node.sandbox.ids): a node's block, its shards' shares, one id per live sandbox."""

import os
from pathlib import Path

import pytest

from host_node.sandbox.ids import ID_BLOCK, IdRange, IdsExhausted, SandboxIds, claim_block, shard_range


def test_shards_split_a_block_without_overlap_and_never_use_its_root() -> None:
    ranges = [shard_range(100_000, shard, 3) for shard in range(3)]
    taken = [set(range(r.first, r.first + r.count)) for r in ranges]

    assert all(r.root == 100_000 for r in ranges)
    assert not (taken[0] & taken[1]) and not (taken[1] & taken[2]) and not (taken[0] & taken[2])
    assert all(100_000 < uid < 100_000 + ID_BLOCK for ids in taken for uid in ids)


def test_a_live_sandbox_holds_its_id_until_it_gives_it_back() -> None:
    ids = SandboxIds(IdRange(root=10, first=11, count=2))
    first, second = ids.take(), ids.take()

    with pytest.raises(IdsExhausted, match="all 2 sandbox ids"):
        ids.take()
    ids.give_back(first)
    ids.give_back(first)  # twice is harmless
    assert ids.take() == first and ids.in_use == 2 and first != second


def test_an_id_given_back_is_taken_again_last() -> None:
    ids = SandboxIds(IdRange(root=10, first=11, count=3))
    first = ids.take()
    ids.give_back(first)

    assert [ids.take(), ids.take(), ids.take()] == [12, 13, first]


def test_nodes_on_one_machine_claim_different_blocks_and_a_gone_nodes_block_is_free(tmp_path: Path) -> None:
    held = [claim_block(100_000, str(tmp_path)) for _ in range(2)]
    assert [start for _, start in held] == [100_000, 100_000 + ID_BLOCK]
    for fd, _ in held:
        os.close(fd)  # what the kernel does for a node killed with -9
    fd, start = claim_block(100_000, str(tmp_path))
    os.close(fd)
    assert start == 100_000


def test_claiming_past_the_last_block_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("host_node.sandbox.ids.MAX_BLOCKS", 1)
    fd, _ = claim_block(100_000, str(tmp_path))
    try:
        with pytest.raises(IdsExhausted, match="held by other nodes"):
            claim_block(100_000, str(tmp_path))
    finally:
        os.close(fd)
