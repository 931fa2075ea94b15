"""Content-addressed function bundles: deterministic tar.gz of a function directory, stored in a
JetStream object store under its SHA-256, fetched and verified by the node that runs it.
"""

import gzip
import hashlib
import io
import logging
import os
import tarfile
from pathlib import Path

from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.object_store import ObjectStore

from schemas.subjects import BUNDLE_BUCKET

log = logging.getLogger(__name__)

DIGEST_PREFIX = "sha256-"
SKIP_NAMES = {"__pycache__", ".git", ".venv", ".pytest_cache"}


class BundleError(Exception):
    pass


def digest_of(data: bytes) -> str:
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def pack_directory(root: Path, max_bytes: int) -> bytes:
    """Tar+gzip `root` reproducibly (sorted names, zeroed times and owners): same files, same digest."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in _walk(root):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if info.mode & 0o111 else 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
            if buf.tell() > max_bytes:
                raise BundleError(f"bundle of {root} is larger than {max_bytes} bytes")
    data = buf.getvalue()
    if len(data) > max_bytes:
        raise BundleError(f"bundle of {root} is {len(data)} bytes, over the {max_bytes} limit")
    return data


def _walk(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_NAMES)
        files.extend(Path(dirpath) / name for name in sorted(filenames) if not name.endswith(".pyc"))
    return sorted(files)


def unpack(data: bytes, dest: Path) -> None:
    """Extract a bundle; regular files only, and nothing may land outside `dest`."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            target = (dest / member.name).resolve()
            if not member.isreg() or not target.is_relative_to(dest.resolve()):
                raise BundleError(f"bundle member {member.name!r} is not a plain file inside the bundle")
        tar.extractall(dest, members=members)


class BundleStore:
    """The cluster's bundle bucket (a JetStream object store, replicated like any stream)."""

    def __init__(self, js: JetStreamContext):
        self._js = js
        self._bucket: ObjectStore | None = None

    async def _store(self) -> ObjectStore:
        if self._bucket is None:
            try:
                self._bucket = await self._js.object_store(BUNDLE_BUCKET)
            except js_errors.BucketNotFoundError:
                self._bucket = await self._js.create_object_store(BUNDLE_BUCKET)
        return self._bucket

    async def upload(self, data: bytes) -> str:
        digest = digest_of(data)
        if not await self.exists(digest):
            await (await self._store()).put(digest, data)
        return digest

    async def exists(self, digest: str) -> bool:
        try:
            await (await self._store()).get_info(digest)
        except js_errors.ObjectNotFoundError:
            return False
        return True

    async def fetch(self, digest: str) -> bytes:
        try:
            result = await (await self._store()).get(digest)
        except js_errors.ObjectNotFoundError:
            raise BundleError(f"bundle {digest} is not in the bundle store") from None
        data = bytes(result.data or b"")
        if digest_of(data) != digest:
            raise BundleError(f"bundle {digest} failed verification: its bytes hash differently")
        return data
