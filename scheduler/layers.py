"""Dependency layers larger than one message: a tenant uploads the parts (each stored as it is,
under its own digest with PART_PREFIX, by whichever replica takes it), then asks for the whole
by its digest and the parts' in order; the replica that takes that joins them, checks the whole
as a bundle within the layer limit, stores it, and drops the parts."""

import asyncio
import logging

from fabric import bundles
from fabric.bundles import PART_PREFIX, BundleError, BundleStore, digest_of

log = logging.getLogger(__name__)

MAX_PARTS = 1024  # each fetched in turn: a layer of a million tiny parts is refused at once
# Layers joined at once by one replica: each holds the whole layer in memory while it is checked
ASSEMBLING_AT_ONCE = 2


class LayerRefused(Exception):
    """What is wrong with the layer, said to the tenant as bad_request."""


class LayerAssembly:
    def __init__(self, store: BundleStore, max_layer_bytes: int):
        self._store = store
        self.max_layer_bytes = max_layer_bytes
        self._room = asyncio.Semaphore(ASSEMBLING_AT_ONCE)

    async def assemble(self, digest: str, parts: list[str]) -> None:
        """Join `parts` into the layer `digest` and store it (LayerRefused with the reason;
        BundleError if the store cannot be read or written now)."""
        if len(parts) > MAX_PARTS:
            raise LayerRefused(f"{len(parts)} parts: a layer is sent in at most {MAX_PARTS}")
        if not all(bundles.is_digest(part) for part in parts):
            raise LayerRefused("a part is not named by a digest (sha256-<64 hex>)")
        async with self._room:
            data = b""
            for part in parts:
                try:
                    data += await self._store.fetch(part, PART_PREFIX)
                except BundleError as exc:
                    raise LayerRefused(f"part {part} of the layer was not uploaded: {exc}") from None
                if len(data) > self.max_layer_bytes:
                    raise LayerRefused(f"the layer is over the limit of {self._limit()} a layer may be")
            if digest_of(data) != digest:
                raise LayerRefused(f"the layer's parts do not hash to {digest}")
            try:
                bundles.check(data)
            except BundleError as exc:
                raise LayerRefused(f"the layer cannot be deployed: {exc}") from None
            await self._store.upload(data)
        for part in set(parts):
            await self._store.delete(part, PART_PREFIX)

    def _limit(self) -> str:
        return f"{self.max_layer_bytes >> 20} MiB"
