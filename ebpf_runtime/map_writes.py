"""A tenant's write to one of its own function's maps, on a node's loaded copy. Only maps the
program declared are reachable (the copy holds no other); `.rodata` is frozen; keys and values
must have the map's sizes; what the kernel refuses (a full map, a bad LPM prefix) is said."""

import errno

from ebpf_runtime.loader import Loaded
from ebpf_runtime.map_text import LPM_TRIE, encode
from fabric import bpf
from schemas.ebpf import MapSpec, MapWrite

QUEUE_OR_STACK = {22, 23}
_KERNEL_SAYS = {
    errno.E2BIG: "the map is full (max_entries {max_entries})",
    errno.ENOSPC: "the map is full (max_entries {max_entries})",
    errno.EINVAL: "the kernel refused the key or value for this map",
    errno.EPERM: "the map is read-only",
}


class MapWriteError(ValueError):
    pass


def apply(program: Loaded, write: MapWrite) -> str:
    """Set or delete the entry; what was done, in words. MapWriteError says why not."""
    found = program.maps.get(write.map)
    if found is None:
        names = ", ".join(sorted(program.maps)) or "none"
        raise MapWriteError(f"{program.function} has no map {write.map!r} (its maps: {names})")
    fd, spec = found
    if spec.frozen:
        raise MapWriteError(
            f"{write.map} is read-only configuration, frozen at load: deploy again to change it"
        )
    try:
        key = _key(write, spec)
        if write.value is None:
            return _delete(fd, key, write, spec)
        value = encode(write.value, spec.value_size, "value")
        bpf.map_update(fd, key, value)
    except ValueError as exc:
        raise MapWriteError(str(exc)) from None
    except bpf.BpfError as exc:
        said = _KERNEL_SAYS.get(exc.errno or 0, "the kernel refused it ({error})")
        raise MapWriteError(f"{write.map}: " + said.format(max_entries=spec.max_entries, error=exc)) from None
    return "pushed" if spec.type in QUEUE_OR_STACK else "set"


def _key(write: MapWrite, spec: MapSpec) -> bytes:
    if spec.type in QUEUE_OR_STACK:
        if write.key:
            raise ValueError(f"{write.map} is a queue or stack: it takes no key (its value is pushed)")
        return b""
    if not write.key:
        raise ValueError(f"{write.map} needs a key ({spec.key_size} bytes)")
    return encode(write.key, spec.key_size, "key", lpm=spec.type == LPM_TRIE)


def _delete(fd: int, key: bytes, write: MapWrite, spec: MapSpec) -> str:
    if spec.type in QUEUE_OR_STACK:
        raise ValueError(f"{write.map} is a queue or stack: its program pops what it holds")
    if spec.global_data or spec.type in (2, 6):  # arrays: every index always exists
        raise ValueError(f"{write.map} is an array: its entries cannot be deleted, set them to 0")
    return "deleted" if bpf.map_delete(fd, key) else "absent already"
