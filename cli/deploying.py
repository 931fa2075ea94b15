"""A deploy's uploads: the function's bundle, and a python function's dependency layer in parts,
each only if the cluster's bundle store lacks it (content-addressed)."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from cli import layers
from fabric.bundles import digest_of
from schemas import codec, subjects
from schemas.messages import UploadBundle

UPLOAD_TIMEOUT_S = 30.0  # the scheduler tries JetStream again for up to 15 s while it elects a leader
Control = Callable[..., Awaitable[Any]]  # Client._control


async def layer(control: Control, tenant: str, requirements: list[str], progress: layers.Progress) -> str:
    """The requirements' layer in the bundle store: built (or taken from the cache), then sent
    in parts unless the store has it; its digest. Raises layers.LayerError."""
    built = await asyncio.to_thread(layers.build, requirements, progress)
    subject = subjects.control(tenant, subjects.UPLOAD)
    held = await control(subject, UploadBundle(digest=built.digest), codec.upload_result, tenant)
    if held.stored:
        progress(f"layer {built.digest[:19]} is in the cluster already: reused")
        return built.digest
    pieces = layers.parts(built.data)
    for number, piece in enumerate(pieces, 1):
        await upload(control, tenant, piece, part=True)
        progress(f"uploading layer {built.digest[:19]}: part {number} of {len(pieces)}")
    whole = UploadBundle(digest=built.digest, parts=[digest_of(piece) for piece in pieces])
    await control(subject, whole, codec.upload_result, tenant, timeout_s=UPLOAD_TIMEOUT_S)
    return built.digest


async def upload(control: Control, tenant: str, bundle: bytes, part: bool = False) -> str:
    """Send the bundle (or a layer's part) to the scheduler unless the store has it already
    (content-addressed: unchanged code is not sent again)."""
    digest = digest_of(bundle)
    subject = subjects.control(tenant, subjects.UPLOAD)
    reply = await control(subject, UploadBundle(digest=digest, part=part), codec.upload_result, tenant)
    if not reply.stored:
        message = UploadBundle(digest=digest, data=bundle, part=part)
        await control(subject, message, codec.upload_result, tenant, timeout_s=UPLOAD_TIMEOUT_S)
    return digest
