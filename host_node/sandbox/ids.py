"""Host ids for sandboxes: each live sandbox runs as, and owns its user namespace under, a host
uid no other sandbox holds, so that what the kernel counts per user is counted per sandbox.

The kernel charges inotify instances and watches, pending signals, message queue bytes, locked
shared memory and processes up the user-namespace chain, to each namespace's *owner* (the uid
that created it): with every sandbox's namespace made by the host's root, 200 `inotify_init1`
in one sandbox took the 128 instances the host's root may hold, from the root and every other
sandbox. And epoll watches, pipe buffers and key quotas are counted per host uid, shared by
every sandbox that runs as the same one. A uid per sandbox (owner and function alike) makes
each of those one sandbox's own.

A node claims a block of ID_BLOCK host ids on its machine (a lock file per block, held while
the node lives, so two nodes on one machine never share ids, and a killed node's block is free
again at once); the block's first id is the sandboxes' namespace root (which runs only the
sandbox's setup), the rest is split between the node's shards, and each shard hands its ids
out one per sandbox and takes them back when the sandbox's init is reaped."""

import fcntl
import os
from collections import deque

import msgspec

ID_BLOCK = 65536
MAX_BLOCKS = 64
LOCK_DIR = "/run/hetfaas/ids"


class IdsExhausted(OSError):
    """Every id of the shard's range is held by a live sandbox."""


class IdRange(msgspec.Struct, frozen=True, kw_only=True):
    root: int  # the host id of every sandbox's namespace root (its setup runs as this)
    first: int  # the shard's sandboxes get host ids first .. first+count-1, one each
    count: int


def claim_block(base: int, lock_dir: str = LOCK_DIR) -> tuple[int, int]:
    """Claim the first block of host ids from `base` that no live node on this machine holds.
    Returns (the lock's fd, to keep open while the node lives; the block's first id)."""
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    for block in range(MAX_BLOCKS):
        start = base + block * ID_BLOCK
        fd = os.open(os.path.join(lock_dir, f"{start}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return fd, start
    raise IdsExhausted(0, f"all {MAX_BLOCKS} blocks of sandbox ids from {base} are held by other nodes")


def shard_range(block_start: int, shard: int, shards: int) -> IdRange:
    """Shard `shard`'s share of a node's block (its first id is the namespace root). Pure."""
    count = (ID_BLOCK - 1) // shards
    return IdRange(root=block_start, first=block_start + 1 + shard * count, count=count)


class SandboxIds:
    """One shard's ids: a sandbox takes one when cloned and gives it back when reaped. Pure."""

    def __init__(self, ids: IdRange):
        # First in, first out: an id given back is taken again last, long after its sandbox's
        # kernel objects (freed as its processes exit) are gone.
        self._free = deque(range(ids.first, ids.first + ids.count))
        self._held: set[int] = set()
        self.count = ids.count

    def take(self) -> int:
        if not self._free:
            raise IdsExhausted(0, f"all {self.count} sandbox ids of this shard are in use by live sandboxes")
        uid = self._free.popleft()
        self._held.add(uid)
        return uid

    def give_back(self, uid: int) -> None:
        if uid in self._held:  # twice is harmless: a sandbox gives its id back once it is reaped
            self._held.remove(uid)
            self._free.append(uid)

    @property
    def in_use(self) -> int:
        return len(self._held)
