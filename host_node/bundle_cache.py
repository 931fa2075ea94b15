"""Function code on this node: fetched once per digest from the bundle store, verified, unpacked."""

import asyncio
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from fabric.bundles import BundleError, BundleStore, is_digest, unpack


class BundleCache:
    def __init__(self, store: BundleStore, root: Path):
        self._store = store
        self._root = root
        self._ready: dict[str, Path] = {}  # digest -> its directory, once unpacked
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        root.mkdir(parents=True, exist_ok=True)

    def ready(self, digest: str) -> Path | None:
        """The bundle's directory if it is unpacked here already (no waiting), else None."""
        return self._ready.get(digest)

    async def ensure(self, digest: str) -> tuple[Path, bool]:
        """The unpacked bundle's directory, and whether this call had to fetch it."""
        ready = self._ready.get(digest)
        if ready is not None:
            return ready, False
        if not is_digest(digest):
            raise BundleError(f"{digest!r} is not a bundle digest")  # also keeps paths inside the cache
        path = self._root / digest
        async with self._locks[digest]:
            if path.is_dir():
                self._ready[digest] = path
                return path, False
            data = await self._store.fetch(digest)
            await asyncio.to_thread(_install, data, self._root, path)
            self._ready[digest] = path
            return path, True


def _install(data: bytes, root: Path, path: Path) -> None:
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
    try:
        unpack(data, staging)
        staging.chmod(0o755)  # mkdtemp made it 0700; the sandbox's unprivileged user must read it
        staging.rename(path)  # atomic: a crash never leaves a half-unpacked bundle in place
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
