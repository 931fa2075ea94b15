"""The running kernel's own types (/sys/kernel/btf/vmlinux): CO-RE relocations are applied against
them (verifier_service/kernel_types.py), and an attestation of a relocated program names their
digest, so that a node whose kernel has other types refuses it."""

import functools
import hashlib
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")


def digest_of(data: bytes) -> str:
    return "sha256-" + hashlib.sha256(data).hexdigest()


@functools.cache
def running_digest() -> str:
    """This kernel's types' digest; "" where it publishes none (CONFIG_DEBUG_INFO_BTF off)."""
    try:
        return digest_of(VMLINUX.read_bytes())
    except OSError:
        return ""
