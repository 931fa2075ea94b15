"""How scheduler replicas split limits and node capacity without talking per invocation. Pure.

Several replicas serve the same queue group, and NATS hands each request to any of them. Two
ways keep them from overcommitting a node or a limit together: a reservation each replica asks
the node (or a store) to confirm, or a fixed share of every limit per replica. A reservation
costs a round trip on every invocation, which is most of a warm invocation's budget here (see
bench/RESULTS.md); shares cost nothing per invocation. So each replica owns a share: a limit of
N split over R live replicas gives each N // R, and the N % R left over go one each to the
replicas after a per-limit offset (a hash of the function or node), so the shares add up to
exactly N and small limits do not all land on the same replica. A replica whose share of a
limit is zero hands that function's invocations to a live one that has a share (or, when none
of those is beating, serves them itself with a share of one).

The price: a replica may turn work away (or queue it) while another has its share unused. Nodes
still refuse work beyond their own capacity (`throttled`), and the scheduler then tries another
node, so a moment's disagreement about the replica count (one just started or died) can cost a
retry, never an overloaded node.
"""

import zlib
from collections.abc import Iterable
from dataclasses import dataclass


def offset_of(name: str) -> int:
    return zlib.crc32(name.encode())


def share(total: int, rank: int, replicas: int, offset: int = 0) -> int:
    """Replica `rank`'s part of `total`; the parts of ranks 0..replicas-1 add up to `total`."""
    if replicas <= 1:
        return total
    base, extra = divmod(total, replicas)
    return base + (1 if (rank - offset) % replicas < extra else 0)


@dataclass(frozen=True)
class Replicas:
    """The live replicas as one replica sees them, itself included."""

    ids: tuple[str, ...]  # sorted
    me: str
    beating: frozenset[str] = frozenset()  # those heard lately (the rest are only registered)

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def rank(self) -> int:
        return self.ids.index(self.me)

    def share(self, total: int, name: str) -> int:
        if len(self.ids) == 1:
            return total  # alone: all of it (and no hashing on the invoke path)
        return share(total, self.rank, self.count, offset_of(name))

    def owner(self, total: int, name: str) -> str | None:
        """A live replica holding a share of `total` (None: none of them is beating)."""
        offset = offset_of(name)
        for rank, rid in enumerate(self.ids):
            if rid != self.me and rid in self.beating and share(total, rank, self.count, offset):
                return rid
        return None


def live_replicas(
    me: str, last_beat: dict[str, float], now: float, stale_after_s: float, registered: Iterable[str] = ()
) -> Replicas:
    """Replicas that beat lately, those registered, and this one."""
    alive = {rid for rid, at in last_beat.items() if now - at <= stale_after_s}
    return Replicas(tuple(sorted(alive | set(registered) | {me})), me, frozenset(alive))
