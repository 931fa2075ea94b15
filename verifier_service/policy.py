"""The isolation policy a tenant program must meet on top of the kernel verifier. Pure: a program
(instructions, type, declared maps, which instruction references which map) in, reasons out.

The rules (docs/architecture.md §5): helpers from a per-type allowlist only; no
kfuncs, no kernel symbols, no tail calls; only maps the program declares, of allowlisted types
(no prog arrays, map-in-map, perf arrays, dev/sock/xsk maps: anything that reaches beyond the
tenant's own data); a length cap far below the kernel's and limits on maps and their memory."""

import msgspec

from schemas.ebpf import PROG_TYPES, MapSpec, Reason
from verifier_service.bytecode import (
    CALL,
    CALL_HELPER,
    CALL_KFUNC,
    LD_IMM64,
    PSEUDO_BTF_ID,
    PSEUDO_FUNC,
    PSEUDO_MAP_FD,
    Insn,
)
from verifier_service.helper_ids import HELPER_NAMES

# The helpers a tenant program may call, by what they touch: only its own packet, its own maps
# (the node creates every one, per tenant), its own stack and the clock. Ids: helper_ids.py.
_MAPS = {1, 2, 3, 87, 88, 89, 93, 94, 164}  # lookup/update/delete, push/pop/peek, spin locks, for_each
_CLOCK_AND_MATH = {5, 7, 8, 28, 118, 125, 160, 181, 182}  # ktime, prandom, cpu id, csum_diff, loop, strncmp
_COMMON = _MAPS | _CLOCK_AND_MATH
ALLOWED_HELPERS = {
    # adjust head/meta/tail, buff len, load/store bytes: all the frame's own
    "xdp": _COMMON | {44, 54, 65, 188, 189, 190},
    # the skb's own bytes, checksums, hash, vlan tags, room, ECN, protocol
    "sched_cls": _COMMON | {9, 10, 11, 18, 19, 26, 31, 34, 38, 39, 40, 41, 43, 48, 50, 68, 97, 135},
    "socket_filter": _COMMON | {26, 68},
}

# Why a helper is denied, by the state beyond the tenant's own that it reaches.
_REASONS = {
    "tail calls jump into program arrays, which could hold programs the tenant does not own": {12},
    "it sends the packet to an interface or socket the platform owns": {13, 23, 51, 152, 155},
    "it reads kernel or other processes' memory": {4, 45, 112, 113, 114, 115, 35, 158},
    "it tells which host process or cgroup is running (another tenant's)": {14, 15, 16, 17, 80},
    "it writes to the host's trace pipe or perf buffers, shared by every tenant": {6, 25, 111, 121, 165, 177},
    "it reads kernel stacks or hardware counters": {22, 27, 67, 55},
    "it signals or changes host processes": {58, 109, 117, 166},
    "it reads the host's routing, neighbour or MTU state": {24, 69, 163},
    "it finds sockets on the host, which may be other tenants'": {84, 85, 86, 99, 46},
    "tunnel metadata steers the packet to devices the platform owns": {20, 21, 30, 33},
    "ring buffers are read by a consumer on the node, which the platform does not run for tenants": {
        130, 131, 132, 133, 134,
    },
}  # fmt: skip
WHY_DENIED = {helper: why for why, helpers in _REASONS.items() for helper in helpers}
DEFAULT_DENIAL = (
    "not reviewed for {prog_type}: only helpers that touch the program's own packet, its own maps, "
    "its stack and the clock are offered"
)

# Map types (enum bpf_map_type) a tenant may declare, and the ones the rules name when refused.
MAP_TYPES = {
    1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash", 10: "lru_percpu_hash",
    11: "lpm_trie", 22: "queue", 23: "stack",
}  # fmt: skip
REFUSED_MAP_TYPES = {
    3: "prog_array", 4: "perf_event_array", 12: "array_of_maps", 13: "hash_of_maps", 14: "devmap",
    15: "sockmap", 16: "cpumap", 17: "xskmap", 18: "sockhash", 27: "ringbuf",
}  # fmt: skip
WHY_MAP_REFUSED = {
    3: "it holds programs (tail-call targets), which could be another tenant's",
    4: "perf buffers are per host, read by no consumer of the tenant's",
    12: "maps of maps could hold another tenant's map",
    13: "maps of maps could hold another tenant's map",
    14: "redirect targets are the platform's interfaces",
    15: "it holds the host's sockets",
    16: "it steers packets to the host's CPUs",
    17: "AF_XDP sockets are the platform's",
    18: "it holds the host's sockets",
    27: "ring buffers need a consumer on the node, which the platform does not run; a queue map "
    "(BPF_MAP_TYPE_QUEUE) holds records for `hetfaas maps` to read",
}
QUEUE_OR_STACK = {22, 23}
LPM_TRIE = 11
NO_PREALLOC = 1  # BPF_F_NO_PREALLOC: the kernel insists on it for an LPM trie
LPM_KEY = range(4 + 1, 4 + 256 + 1)  # a 4-byte prefix length, then 1..256 bytes of data


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    max_insns: int = 4096  # the kernel's unprivileged cap, far below its 1M
    max_maps: int = 8
    max_map_bytes: int = 16 * 1024 * 1024  # all of a program's maps together
    max_entries: int = 1 << 20


class Program(msgspec.Struct, frozen=True, kw_only=True):
    insns: list[Insn]
    prog_type: str
    maps: list[MapSpec]
    map_refs: dict[int, str]  # ld_imm64 index -> the declared map it loads (from relocations)


def check(program: Program, limits: Limits) -> list[Reason]:
    reasons = _prog_type(program) + _maps(program.maps, limits)
    declared = {spec.name for spec in program.maps}
    allowed = ALLOWED_HELPERS.get(program.prog_type, set())
    for index, insn in enumerate(program.insns):
        if insn.code == CALL:
            reasons += _call(insn, index, allowed, program.prog_type)
        elif insn.code == LD_IMM64:
            reasons += _load(insn, index, program.map_refs, declared)
    return reasons


def _prog_type(program: Program) -> list[Reason]:
    if program.prog_type in PROG_TYPES:
        return []
    known = ", ".join(sorted(PROG_TYPES))
    return [Reason("prog_type", f"program type {program.prog_type!r} is not offered (one of {known})")]


def _call(insn: Insn, index: int, allowed: set[int], prog_type: str) -> list[Reason]:
    if insn.src == CALL_KFUNC:
        return [Reason("kfunc", f"kfunc call (BTF id {insn.imm}): kernel functions are not offered", index)]
    if insn.src != CALL_HELPER:
        return []  # a call to one of the program's own subprograms
    if insn.imm == 12:
        return [Reason("tail_call", "bpf_tail_call: " + WHY_DENIED[12], index)]
    if insn.imm in allowed:
        return []
    name = HELPER_NAMES.get(insn.imm, f"helper #{insn.imm}")
    why = WHY_DENIED.get(insn.imm) or DEFAULT_DENIAL.format(prog_type=prog_type)
    return [Reason("helper_denied", f"{name}: {why}", index)]


def _load(insn: Insn, index: int, map_refs: dict[int, str], declared: set[str]) -> list[Reason]:
    """An ld_imm64: a constant, a callback, or a map reference, which must come from a relocation
    onto one of the program's declared maps (the node substitutes its own map's fd there)."""
    if insn.src == PSEUDO_BTF_ID:
        return [Reason("kernel_symbol", "ld_imm64 of a kernel symbol (ksym): not offered", index)]
    name = map_refs.get(index)
    if name is not None:
        if name not in declared:
            return [
                Reason("forged_map_ref", f"loads map {name!r}, which the program does not declare", index)
            ]
        if insn.src not in (0, PSEUDO_MAP_FD):
            return [Reason("forged_map_ref", f"map {name!r} is loaded with pseudo type {insn.src}", index)]
        return []
    if insn.src in (0, PSEUDO_FUNC):
        return []  # a 64-bit constant, or a callback's address
    return [Reason("forged_map_ref", "loads a map by a number the program did not get from us", index)]


def _maps(maps: list[MapSpec], limits: Limits) -> list[Reason]:
    reasons = []
    if len(maps) > limits.max_maps:
        reasons.append(Reason("too_many_maps", f"{len(maps)} maps, over the limit of {limits.max_maps}"))
    for spec in maps:
        if spec.type in REFUSED_MAP_TYPES:
            kind = REFUSED_MAP_TYPES[spec.type]
            why = WHY_MAP_REFUSED[spec.type]
            reasons.append(
                Reason("map_type", f"map {spec.name!r} is a {kind}, not offered to tenants: {why}")
            )
            continue  # its shape is beside the point
        if spec.type not in MAP_TYPES:
            offered = ", ".join(sorted(MAP_TYPES.values()))
            reasons.append(
                Reason("map_type", f"map {spec.name!r} has type {spec.type}, not offered (one of {offered})")
            )
            continue
        if problem := _shape_problem(spec, limits):
            reasons.append(Reason("map_shape", f"map {spec.name!r} ({MAP_TYPES[spec.type]}) {problem}"))
    total = sum(spec.memory_bytes for spec in maps)
    if total > limits.max_map_bytes:
        reasons.append(
            Reason("map_memory", f"maps need {total} bytes, over the limit of {limits.max_map_bytes}")
        )
    return reasons


def _shape_problem(spec: MapSpec, limits: Limits) -> str | None:
    if not 0 < spec.max_entries <= limits.max_entries:
        return f"has max_entries {spec.max_entries}: it must be 1..{limits.max_entries}"
    if spec.value_size <= 0:
        return "has no value size"
    if spec.type in QUEUE_OR_STACK:
        return None if spec.key_size == 0 else "has a key: queues and stacks take none (key_size 0)"
    if spec.type == LPM_TRIE:
        if spec.key_size not in LPM_KEY:
            return f"has key_size {spec.key_size}: a 4-byte prefix length and 1..256 bytes of data"
        if not spec.flags & NO_PREALLOC:
            return "needs map_flags BPF_F_NO_PREALLOC (the kernel allocates trie nodes as they come)"
        return None
    return None if spec.key_size > 0 else "has no key size"
