"""Content-addressed function bundles: deterministic tar.gz of a function directory, stored in a
JetStream object store under its SHA-256, fetched and verified by the node that runs it.
"""

import gzip
import hashlib
import io
import logging
import os
import re
import tarfile
from pathlib import Path

from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.object_store import ObjectStore

from schemas.subjects import BUNDLE_BUCKET

log = logging.getLogger(__name__)

DIGEST_PREFIX = "sha256-"
DIGEST_RE = re.compile(r"^sha256-[0-9a-f]{64}$")
SKIP_NAMES = {"__pycache__", ".git", ".venv", ".pytest_cache"}
# What a bundle may unpack to: checked at deploy (the scheduler reads the headers) and again on
# the node, which stops reading at the first header past a bound, so a bomb (2 MB unpacking to
# 2 GiB) costs neither disk nor the time to inflate it. Room for a function with its libraries.
MAX_UNPACKED_BYTES = 256 * 1024 * 1024
MAX_FILES = 20_000
MAX_DEPTH = 32  # path components of one member


class BundleError(Exception):
    pass


class BundleCorrupt(BundleError):
    """The bytes stored under a digest hash differently."""


def is_digest(text: str) -> bool:
    """A bundle digest (`sha256-` and 64 hex digits): nothing else names a bundle, or a path."""
    return DIGEST_RE.match(text) is not None


def digest_of(data: bytes) -> str:
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def pack_directory(root: Path, max_bytes: int) -> bytes:
    """Tar+gzip `root` reproducibly (sorted names, zeroed times and owners): same files, same digest."""
    buf = io.BytesIO()
    files = _walk(root)
    if len(files) > MAX_FILES or sum(path.stat().st_size for path in files) > MAX_UNPACKED_BYTES:
        raise BundleError(f"{root} holds more than {MAX_FILES} files or {MAX_UNPACKED_BYTES >> 20} MiB")
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in files:
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


def _members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The bundle's members, read header by header; the first that breaks a rule (not a plain
    file inside the bundle, too deep, one file too many, the unpacked size past its bound) stops
    the reading there, before its contents are inflated."""
    members: list[tarfile.TarInfo] = []
    unpacked = 0
    try:
        while (member := tar.next()) is not None:
            parts = Path(member.name).parts
            if not member.isreg() or member.name.startswith("/") or ".." in parts:
                raise BundleError(f"bundle member {member.name!r} is not a plain file inside the bundle")
            if len(parts) > MAX_DEPTH:
                raise BundleError(f"bundle member {member.name!r} is deeper than {MAX_DEPTH} directories")
            if len(members) == MAX_FILES:
                raise BundleError(f"the bundle holds more than {MAX_FILES} files")
            unpacked += member.size
            if unpacked > MAX_UNPACKED_BYTES:
                raise BundleError(f"the bundle unpacks to more than {MAX_UNPACKED_BYTES >> 20} MiB")
            members.append(member)
    except (tarfile.TarError, OSError, EOFError) as exc:  # not a tar.gz, or cut short
        raise BundleError(f"the bundle is not a readable tar.gz: {exc}") from None
    return members


def _open(data: bytes) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"the bundle is not a readable tar.gz: {exc}") from None


def check(data: bytes) -> None:
    """Refuse, with the reason, a bundle that `unpack` would refuse (reads headers only)."""
    with _open(data) as tar:
        _members(tar)


def unpack(data: bytes, dest: Path) -> None:
    """Extract a bundle: plain files only, nothing outside `dest`, within the bounds above."""
    with _open(data) as tar:
        members = _members(tar)
        tar.extractall(dest, members=members, filter="data")


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
        if not await self.holds(digest):
            await (await self._store()).put(digest, data)
        return digest

    async def exists(self, digest: str) -> bool:
        """Whether an object is stored under `digest` (its metadata only: nodes check the bytes
        when they fetch them, and an upload checks them with `holds`)."""
        try:
            await (await self._store()).get_info(digest)
        except js_errors.ObjectNotFoundError:
            return False
        return True

    async def holds(self, digest: str) -> bool:
        """Whether the store holds the bundle `digest` names, its bytes checked: an object under
        that name whose bytes hash differently (planted, or damaged) is deleted and reported, so
        the owner's next upload repairs it rather than being told it is there."""
        try:
            await self.fetch(digest)
        except BundleCorrupt as exc:
            log.error("deleting %s from the bundle store: %s", digest, exc)
            await (await self._store()).delete(digest)
            return False
        except BundleError:  # not there
            return False
        return True

    async def fetch(self, digest: str) -> bytes:
        try:
            result = await (await self._store()).get(digest)
        except js_errors.ObjectNotFoundError:
            raise BundleError(f"bundle {digest} is not in the bundle store") from None
        data = bytes(result.data or b"")
        if digest_of(data) != digest:
            raise BundleCorrupt(f"bundle {digest} failed verification: its bytes hash differently")
        return data
