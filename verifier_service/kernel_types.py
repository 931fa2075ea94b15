"""The running kernel's types, indexed for CO-RE relocation (fabric/kernel_types.py has their
digest). Read once per process: 5.4 MB, 0.2 s to index here."""

import functools

from fabric.kernel_types import VMLINUX, digest_of
from verifier_service.btf import Btf


class KernelTypes:
    def __init__(self, data: bytes):
        self.btf = Btf(data)
        self.digest = digest_of(data)


@functools.cache
def running() -> KernelTypes | None:
    """This kernel's types; None where it publishes none (CONFIG_DEBUG_INFO_BTF off)."""
    try:
        return KernelTypes(VMLINUX.read_bytes())
    except OSError:
        return None
