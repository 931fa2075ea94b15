"""Content-addressed function bundles: deterministic tar.gz of a function directory, stored in a
JetStream object store under its SHA-256, fetched and verified by the node that runs it.
"""

import asyncio
import base64
import gzip
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path

from nats import errors as nats_errors
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.api import ObjectInfo, ObjectStoreConfig
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


def pack_directory(root: Path, max_bytes: int, keep_bytecode: bool = False) -> bytes:
    """Tar+gzip `root` reproducibly (sorted names, zeroed times and owners): same files, same
    digest. Bytecode is left out (a node compiles what it imports) unless `keep_bytecode` (a
    dependency layer's, compiled without timestamps: cli/layers.py)."""
    buf = io.BytesIO()
    files = _walk(root, keep_bytecode)
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


def _walk(root: Path, keep_bytecode: bool = False) -> list[Path]:
    skipped = SKIP_NAMES - {"__pycache__"} if keep_bytecode else SKIP_NAMES
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skipped)
        names = sorted(filenames) if keep_bytecode else sorted(n for n in filenames if not n.endswith(".pyc"))
        files.extend(Path(dirpath) / name for name in names)
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


STREAM = f"OBJ_{BUNDLE_BUCKET}"  # the JetStream stream under the bundle bucket
# When the NATS server leading the bucket dies, JetStream elects another in 4-9 s (nats-server's
# raft election timeouts): an upload meanwhile times out (measured: 1 in 3 deploys right after a
# kill -9 of a server failed so). It is tried again within this budget.
UPLOAD_BUDGET_S = 15.0
RETRY_PAUSE_S = 0.5
LEADERLESS = (nats_errors.TimeoutError, nats_errors.NoRespondersError, js_errors.ServiceUnavailableError)
# A stored object's size is believed only up to this (a bundle is at most the scheduler's
# max_payload_bytes, far below): a forged metadata record cannot make a node read for ever.
MAX_STORED_BYTES = 64 * 1024 * 1024
# Where a dependency layer's parts are stored (scheduler/layers.py): a name no bundle has, so a
# part, which is not checked as a bundle, is never taken for one
PART_PREFIX = "part-"


class BundleStore:
    """The cluster's bundle bucket (a JetStream object store, replicated like any stream).

    `replicas`: a writer's (the scheduler's) copies of every bundle, on that many NATS servers:
    it creates the bucket so, and raises an older bucket's copies to it (JetStream copies what
    is stored to the new replicas). None: a reader (nodes), which never creates the bucket."""

    def __init__(self, js: JetStreamContext, replicas: int | None = None):
        self._js = js
        self._replicas = replicas
        self._bucket: ObjectStore | None = None

    async def _store(self) -> ObjectStore:
        if self._bucket is None:
            try:
                bucket = await self._js.object_store(BUNDLE_BUCKET)
            except js_errors.BucketNotFoundError:
                if self._replicas is None:
                    raise BundleError("no bundle has been deployed to this cluster yet") from None
                config = ObjectStoreConfig(replicas=self._replicas)
                bucket = await self._js.create_object_store(BUNDLE_BUCKET, config=config)
            if self._replicas is not None:
                await self._keep_replicas()
            self._bucket = bucket
        return self._bucket

    async def _keep_replicas(self) -> None:
        stream = f"OBJ_{BUNDLE_BUCKET}"
        config = (await self._js.stream_info(stream)).config
        if self._replicas is not None and (config.num_replicas or 1) < self._replicas:
            log.info("raising the bundle store's copies from %s to %d", config.num_replicas, self._replicas)
            config.num_replicas = self._replicas
            await self._js.update_stream(config)

    async def upload(self, data: bytes, budget_s: float = UPLOAD_BUDGET_S, prefix: str = "") -> str:
        """Store `data` under its digest (unless it is there), trying again while JetStream
        has no leader for the bucket, for at most `budget_s`. With a `prefix` (PART_PREFIX) it is
        stored under that name beside the bundles, never as one."""
        digest = digest_of(data)
        deadline = asyncio.get_running_loop().time() + budget_s
        while True:
            try:
                if not await self.holds(digest, prefix):
                    await (await self._store()).put(prefix + digest, data)
                return digest
            except LEADERLESS as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.warning(
                    "bundle store without a leader (%s): trying %s again", exc or type(exc).__name__, digest
                )
                await asyncio.sleep(RETRY_PAUSE_S)  # JetStream says nothing when it has one again

    async def delete(self, digest: str, prefix: str = "") -> None:
        """Drop an object (a layer's part once the layer is stored); nothing if it is gone."""
        try:
            await (await self._store()).delete(prefix + digest)
        except js_errors.NotFoundError:
            pass

    async def exists(self, digest: str) -> bool:
        """Whether an object is stored under `digest` (its metadata only: nodes check the bytes
        when they fetch them, and an upload checks them with `holds`)."""
        return await self._info(digest) is not None

    async def _info(self, digest: str) -> ObjectInfo | None:
        """The object's metadata, by a direct get: any server holding a copy of the bucket
        answers, so it works while JetStream elects a new leader (a kill -9 of the NATS server
        that led it made the object store's own get, which needs a consumer, time out for
        several seconds)."""
        meta = f"$O.{BUNDLE_BUCKET}.M.{base64.urlsafe_b64encode(digest.encode()).decode()}"
        try:
            msg = await self._js.get_msg(STREAM, subject=meta, direct=True)
        except js_errors.NotFoundError:
            return None
        except nats_errors.NoRespondersError:
            raise BundleError("no bundle has been deployed to this cluster yet") from None
        info = ObjectInfo.from_response(json.loads(msg.data or b"{}"))
        return None if info.deleted else info

    async def holds(self, digest: str, prefix: str = "") -> bool:
        """Whether the store holds the bundle `digest` names, its bytes checked: an object under
        that name whose bytes hash differently (planted, or damaged) is deleted and reported, so
        the owner's next upload repairs it rather than being told it is there."""
        try:
            await self.fetch(digest, prefix)
        except BundleCorrupt as exc:
            log.error("deleting %s from the bundle store: %s", prefix + digest, exc)
            await (await self._store()).delete(prefix + digest)
            return False
        except BundleError:  # not there
            return False
        return True

    async def fetch(self, digest: str, prefix: str = "") -> bytes:
        """The bundle's bytes, chunk by chunk with direct gets (see `_info`), checked."""
        info = await self._info(prefix + digest)
        if info is None:
            raise BundleError(f"bundle {digest} is not in the bundle store")
        if (info.size or 0) > MAX_STORED_BYTES or (info.chunks or 0) > MAX_STORED_BYTES // 1024:
            raise BundleCorrupt(
                f"bundle {digest} is stored as {info.size} bytes, more than any bundle may be"
            )
        chunk_subject, seq = f"$O.{BUNDLE_BUCKET}.C.{info.nuid}", 0
        chunks: list[bytes] = []
        while len(chunks) < (info.chunks or 0):
            try:
                msg = await self._js.get_msg(
                    STREAM, seq=seq + 1, subject=chunk_subject, direct=True, next=True
                )
            except js_errors.NotFoundError:
                raise BundleCorrupt(f"bundle {digest} lost chunks in the bundle store") from None
            chunks.append(msg.data or b"")
            seq = msg.seq or seq + 1
        data = b"".join(chunks)
        if digest_of(data) != digest:
            raise BundleCorrupt(f"bundle {digest} failed verification: its bytes hash differently")
        return data
