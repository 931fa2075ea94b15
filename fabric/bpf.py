"""The bpf(2) calls hetfaas makes, through ctypes (CPython has no binding): creating maps, loading
programs, reading back what the kernel verified, running programs on test input. Attribute
layouts from include/uapi/linux/bpf.h (checked against this kernel by the integration tests)."""

import ctypes
import mmap
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

from fabric import prog_btf, syscalls
from schemas.ebpf import MapSpec

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_ARCH = syscalls.here()  # x86_64 hosts, aarch64 DPUs: the numbers differ (bpf is 321 and 280)
SYS_BPF, SYS_CAPSET = _ARCH.numbers["bpf"], _ARCH.numbers["capset"]

# bpf(2) commands
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, PROG_TEST_RUN, OBJ_GET_INFO_BY_FD, BTF_LOAD, MAP_FREEZE = 5, 10, 15, 18, 22
ATTR_SIZE = 128
PROG_INFO_SIZE = 232
VERIFIED_INSNS_OFFSET = 216  # struct bpf_prog_info.verified_insns
LOG_SIZE = 1 << 20


class BpfError(OSError):
    """A bpf(2) call failed; `log` holds the kernel verifier's log for a refused program."""

    def __init__(self, errno: int, what: str, log: str = ""):
        super().__init__(errno, f"{what}: {os.strerror(errno)}")
        self.log = log


def _call(command: int, attr: ctypes.Array, what: str) -> int:
    result = _libc.syscall(SYS_BPF, command, attr, ctypes.sizeof(attr))
    if result < 0:
        raise BpfError(ctypes.get_errno(), what)
    return result


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> int:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<IIIII", attr, 0, map_type, key_size, value_size, max_entries, flags)
    return _call(MAP_CREATE, attr, "map create")


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    """Set key to value; a queue or stack (no key) pushes the value (the kernel wants a NULL key)."""
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value_buffer = ctypes.create_string_buffer(value, len(value))
    key_address = ctypes.addressof(key_buffer) if key else 0
    struct.pack_into("<IIQQQ", attr, 0, fd, 0, key_address, ctypes.addressof(value_buffer), flags)
    _call(MAP_UPDATE_ELEM, attr, "map update")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete key; False when there was none."""
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    key_buffer = ctypes.create_string_buffer(key, len(key))
    struct.pack_into("<IIQ", attr, 0, fd, 0, ctypes.addressof(key_buffer))
    try:
        _call(MAP_DELETE_ELEM, attr, "map delete")
    except BpfError as exc:
        if exc.errno == 2:  # ENOENT
            return False
        raise
    return True


def map_freeze(fd: int) -> None:
    """No more writes from user space (BPF_MAP_FREEZE); with BPF_F_RDONLY_PROG, none from
    programs either: the verifier may then treat its contents as constants."""
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<I", attr, 0, fd)
    _call(MAP_FREEZE, attr, "map freeze")


def create_map(spec: MapSpec) -> int:
    """A map of `spec`'s shape; global data gets its initial contents, and `.rodata` is frozen."""
    fd = map_create(spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags)
    try:
        if spec.initial:
            map_update(fd, bytes(4), spec.initial.ljust(spec.value_size, b"\0"))
        if spec.frozen:
            map_freeze(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value = ctypes.create_string_buffer(value_size)
    struct.pack_into("<IIQQQ", attr, 0, fd, 0, ctypes.addressof(key_buffer), ctypes.addressof(value), 0)
    try:
        _call(MAP_LOOKUP_ELEM, attr, "map lookup")
    except BpfError as exc:
        if exc.errno == 2:  # ENOENT: no such key
            return None
        raise
    return value.raw


def map_keys(fd: int, key_size: int, limit: int) -> list[bytes]:
    """Up to `limit` keys of a map, in the kernel's order (BPF_MAP_GET_NEXT_KEY from no key)."""
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    current = ctypes.create_string_buffer(key_size)
    following = ctypes.create_string_buffer(key_size)
    keys: list[bytes] = []
    first = True
    while len(keys) < limit:
        struct.pack_into(
            "<IIQQ", attr, 0, fd, 0, 0 if first else ctypes.addressof(current), ctypes.addressof(following)
        )
        try:
            _call(MAP_GET_NEXT_KEY, attr, "map next key")
        except BpfError as exc:
            if exc.errno == 2:  # ENOENT: that was the last key
                break
            raise
        keys.append(following.raw)
        ctypes.memmove(current, following, key_size)
        first = False
    return keys


def prog_load(
    prog_type: int, insns: bytes, license_text: str, name: str, log_level: int = 1, log_size: int = LOG_SIZE
) -> tuple[int, str]:
    """Load a program; (fd, the verifier's log). BpfError carries the log when it is refused
    (ENOSPC: the log did not fit in `log_size`). A program with callbacks is loaded with the
    function info the kernel needs for them (fabric/prog_btf.py)."""
    if not prog_btf.needs_func_info(insns):
        return _prog_load(prog_type, insns, license_text, name, log_level, log_size)
    blob, records, count = prog_btf.func_info(insns)
    btf_fd = btf_load(blob)
    try:
        return _prog_load(prog_type, insns, license_text, name, log_level, log_size, (btf_fd, records, count))
    finally:
        os.close(btf_fd)


def btf_load(blob: bytes) -> int:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    data = ctypes.create_string_buffer(blob, len(blob))
    log = ctypes.create_string_buffer(4096)
    struct.pack_into("<QQIII", attr, 0, ctypes.addressof(data), ctypes.addressof(log), len(blob), len(log), 1)
    result = _libc.syscall(SYS_BPF, BTF_LOAD, attr, ATTR_SIZE)
    if result < 0:
        raise BpfError(ctypes.get_errno(), "BTF load", log.value.decode(errors="replace"))
    return result


def _prog_load(
    prog_type: int,
    insns: bytes,
    license_text: str,
    name: str,
    log_level: int,
    log_size: int,
    functions: tuple[int, bytes, int] | None = None,  # (BTF fd, func_info records, count)
) -> tuple[int, str]:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    code = ctypes.create_string_buffer(insns, len(insns))
    license_buffer = ctypes.create_string_buffer(license_text.encode() + b"\0")
    log = _log_buffer(log_size if log_level else 1)
    log[0] = 0
    log_address = ctypes.addressof(ctypes.c_char.from_buffer(log)) if log_level else 0
    struct.pack_into(
        "<IIQQIIQII16s",
        attr,
        0,
        prog_type,
        len(insns) // 8,
        ctypes.addressof(code),
        ctypes.addressof(license_buffer),
        log_level,
        log_size if log_level else 0,  # the kernel insists on 0 without a log
        log_address,
        0,
        0,
        _object_name(name),
    )
    if functions is not None:  # prog_btf_fd @72, func_info_rec_size @76, func_info @80, func_info_cnt @88
        btf_fd, records, count = functions
        info = ctypes.create_string_buffer(records, len(records))
        struct.pack_into(
            "<IIQI", attr, 72, btf_fd, prog_btf.FUNC_INFO_REC_SIZE, ctypes.addressof(info), count
        )
    result = _libc.syscall(SYS_BPF, PROG_LOAD, attr, ATTR_SIZE)
    errno = ctypes.get_errno()
    text = log[: log.find(b"\0")].decode(errors="replace")
    if result < 0:
        raise BpfError(errno, "program load", text)
    return result, text


_log_buffers: dict[tuple[int, int], mmap.mmap] = {}


def _log_buffer(size: int) -> mmap.mmap:
    """A log buffer of `size`, one per size and thread, kept: anonymous memory, so a 64 MiB one
    costs only the pages a log writes (a zeroed bytes buffer of 64 MiB took 45 ms to make)."""
    key = (size, threading.get_ident())
    if (buffer := _log_buffers.get(key)) is None:
        buffer = _log_buffers[key] = mmap.mmap(-1, size)
    return buffer


def _object_name(name: str) -> bytes:
    """The kernel takes only [A-Za-z0-9_.] in a program's name (EINVAL otherwise), 15 at most."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_.") else "_" for c in name).encode()[:15]


def verified_insns(prog_fd: int) -> int:
    info = ctypes.create_string_buffer(PROG_INFO_SIZE)
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<IIQ", attr, 0, prog_fd, PROG_INFO_SIZE, ctypes.addressof(info))
    _call(OBJ_GET_INFO_BY_FD, attr, "program info")
    return struct.unpack_from("<I", info, VERIFIED_INSNS_OFFSET)[0]


def test_run(prog_fd: int, data: bytes, repeat: int = 1) -> tuple[int, bytes, int]:
    """Run the program on `data`: (return value, output data, duration in ns per run)."""
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    data_in = ctypes.create_string_buffer(data, len(data))
    out_size = max(len(data) + 512, 4096)  # room for an XDP program that grows the packet
    data_out = ctypes.create_string_buffer(out_size)
    struct.pack_into(
        "<IIIIQQII", attr, 0, prog_fd, 0, len(data), out_size,
        ctypes.addressof(data_in), ctypes.addressof(data_out), repeat, 0,
    )  # fmt: skip
    _call(PROG_TEST_RUN, attr, "test run")
    retval, size_out = struct.unpack_from("<I", attr, 4)[0], struct.unpack_from("<I", attr, 12)[0]
    duration = struct.unpack_from("<I", attr, 36)[0]
    return retval, data_out.raw[:size_out], duration


PSEUDO_MAP_FD, PSEUDO_MAP_VALUE = 1, 2
LD_IMM64 = 0x18


def relocate_maps(
    instructions: bytes, map_refs: dict[int, str], fds: dict[str, int], by_value: frozenset[str] = frozenset()
) -> bytes:
    """Point each map-loading ld_imm64 at our own map: src_reg = BPF_PSEUDO_MAP_FD, imm = its fd.
    Maps in `by_value` (global data) are loaded as an address into their value instead
    (BPF_PSEUDO_MAP_VALUE; the second half's imm, the offset, stays as linked)."""
    code = bytearray(instructions)
    for index, name in map_refs.items():
        at = index * 8
        if code[at] != LD_IMM64:
            raise ValueError(f"instruction {index} loads no map")
        pseudo = PSEUDO_MAP_VALUE if name in by_value else PSEUDO_MAP_FD
        code[at + 1] = (code[at + 1] & 0x0F) | pseudo << 4
        struct.pack_into("<i", code, at + 4, fds[name])
    return bytes(code)


CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF = 12, 38, 39
# The privilege a load runs with decides how the kernel verifies (docs/architecture.md §5):
# strict: CAP_BPF and CAP_NET_ADMIN only: no pointer leaks, Spectre v1/v4 hardening on.
# proven: CAP_PERFMON too: pointer arithmetic and comparisons of privileged loaders, bounded loops
#   walked without speculative paths, no Spectre hardening; the verifier service proves from the
#   kernel's own log that no pointer or unwritten stack reaches anything the program can expose.
MODE_CAPABILITIES = {"strict": (CAP_BPF, CAP_NET_ADMIN), "proven": (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON)}
MODES = tuple(MODE_CAPABILITIES)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


def _capset(effective: tuple[int, ...], permitted: tuple[int, ...]) -> None:
    data = (_CapData * 2)()
    for cap in effective:
        data[cap // 32].effective |= 1 << cap % 32
    for cap in permitted:
        data[cap // 32].permitted |= 1 << cap % 32
    if _libc.syscall(SYS_CAPSET, ctypes.byref(_CapHeader(0x20080522, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def keep_only_bpf_capabilities(mode: str = "strict") -> None:
    """Drop every capability of the calling thread but those of `mode` (CAP_BPF and CAP_NET_ADMIN,
    what loading and running xdp/tc/socket programs needs, and CAP_PERFMON for proven mode).
    capset(2) acts on one thread, which is what lets a root process keep a thread per mode."""
    caps = MODE_CAPABILITIES[mode]
    _capset(caps, caps)


def switch_mode(mode: str) -> None:
    """A thread that kept every mode's capabilities permitted (keep_modes_permitted) verifies in
    `mode` from now: only that mode's capabilities are effective, and the kernel checks those."""
    _capset(MODE_CAPABILITIES[mode], MODE_CAPABILITIES["proven"])


def keep_modes_permitted() -> None:
    """Keep only what the most privileged mode needs, permitted; effective as strict mode."""
    _capset(MODE_CAPABILITIES["strict"], MODE_CAPABILITIES["proven"])


# Loads on a node go through the thread of the program's attested mode, so they are verified
# exactly as the verifier service verified them (same privileges, hence the same verified_insns).
loaders = {
    mode: ThreadPoolExecutor(max_workers=1, initializer=keep_only_bpf_capabilities, initargs=(mode,))
    for mode in MODES
}
strict_loader = loaders["strict"]
