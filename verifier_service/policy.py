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

# Helper ids (include/uapi/linux/bpf.h, ___BPF_FUNC_MAPPER) that the rules name.
HELPER_NAMES = {
    1: "bpf_map_lookup_elem", 2: "bpf_map_update_elem", 3: "bpf_map_delete_elem",
    4: "bpf_probe_read", 5: "bpf_ktime_get_ns", 6: "bpf_trace_printk", 7: "bpf_get_prandom_u32",
    8: "bpf_get_smp_processor_id", 9: "bpf_skb_store_bytes", 10: "bpf_l3_csum_replace",
    11: "bpf_l4_csum_replace", 12: "bpf_tail_call", 14: "bpf_get_current_pid_tgid",
    23: "bpf_redirect", 25: "bpf_perf_event_output", 26: "bpf_skb_load_bytes",
    28: "bpf_csum_diff", 35: "bpf_get_current_task", 44: "bpf_xdp_adjust_head",
    51: "bpf_redirect_map", 54: "bpf_xdp_adjust_meta", 58: "bpf_override_return",
    65: "bpf_xdp_adjust_tail", 109: "bpf_send_signal", 112: "bpf_probe_read_user",
    113: "bpf_probe_read_kernel", 130: "bpf_ringbuf_output", 166: "bpf_sys_bpf",
}  # fmt: skip
_COMMON = {1, 2, 3, 5, 7, 8, 28}
ALLOWED_HELPERS = {
    "xdp": _COMMON | {44, 54, 65},
    "sched_cls": _COMMON | {9, 10, 11, 26},
    "socket_filter": _COMMON | {26},
}
WHY_DENIED = {
    12: "tail calls could jump into programs the tenant does not own",
    23: "raw bpf_redirect can send packets to any interface",
    51: "redirect maps are the platform's, not the tenant's",
}

# Map types (enum bpf_map_type) a tenant may declare, and the ones the rules name when refused.
MAP_TYPES = {1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash", 10: "lru_percpu_hash"}
REFUSED_MAP_TYPES = {
    3: "prog_array", 4: "perf_event_array", 12: "array_of_maps", 13: "hash_of_maps", 14: "devmap",
    15: "sockmap", 16: "cpumap", 17: "xskmap", 18: "sockhash", 27: "ringbuf",
}  # fmt: skip


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
    why = WHY_DENIED.get(insn.imm, f"not on the {prog_type} allowlist")
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
            reasons.append(Reason("map_type", f"map {spec.name!r} is a {kind}: not offered to tenants"))
        elif spec.type not in MAP_TYPES:
            reasons.append(Reason("map_type", f"map {spec.name!r} has unknown type {spec.type}"))
        if not 0 < spec.max_entries <= limits.max_entries or spec.key_size <= 0 or spec.value_size <= 0:
            reasons.append(Reason("map_shape", f"map {spec.name!r} has an invalid shape"))
    total = sum(spec.memory_bytes for spec in maps)
    if total > limits.max_map_bytes:
        reasons.append(
            Reason("map_memory", f"maps need {total} bytes, over the limit of {limits.max_map_bytes}")
        )
    return reasons
