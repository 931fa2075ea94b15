"""The verifier's structural checks and isolation policy, on a corpus of hostile programs (each
must be rejected for its own reason) and legitimate ones (each must pass). Pure logic."""

import pytest

from schemas.ebpf import MapSpec
from tests.unit.bpf_asm import (
    R0,
    R1,
    R2,
    R3,
    R10,
    add64_imm,
    call,
    call_kfunc,
    exit_,
    ja,
    jgt_reg,
    ld_imm64,
    ldx_w,
    mov64_reg,
    ret,
    stx_w,
)
from verifier_service.bytecode import Insn, decode, encode, structure
from verifier_service.policy import Limits, Program, check

XDP_PASS, XDP_DROP = 2, 1
COUNTERS = MapSpec(name="counters", type=2, key_size=4, value_size=8, max_entries=4)


def verdict(insns: list[Insn], prog_type: str = "xdp", maps=(COUNTERS,), map_refs=None) -> list[str]:
    """Reason codes, structural first; policy only for a well-formed stream (as the service does)."""
    raw = encode(insns)
    reasons = structure(raw, Limits().max_insns)
    if not reasons:
        program = Program(insns=decode(raw), prog_type=prog_type, maps=list(maps), map_refs=map_refs or {})
        reasons = check(program, Limits())
    return [reason.code for reason in reasons]


def lookup_counter() -> tuple[list[Insn], dict[int, str]]:
    """key = 0 on the stack; r0 = bpf_map_lookup_elem(&counters, &key); return XDP_PASS."""
    insns = [
        Insn(0x62, R10, 0, -4, 0),  # *(u32 *)(r10 - 4) = 0
        mov64_reg(R2, R10),
        add64_imm(R2, -4),
        *ld_imm64(R1, 0),  # relocated onto `counters`
        call(1),
        *ret(XDP_PASS),
    ]
    return insns, {3: "counters"}


LEGITIMATE = {
    "pass": (ret(XDP_PASS), "xdp", {}),
    "map lookup": (lookup_counter()[0], "xdp", lookup_counter()[1]),
    "bounds-checked packet read": (
        [
            ldx_w(R2, R1, 0),  # data
            ldx_w(R3, R1, 4),  # data_end
            mov64_reg(R1, R2),
            add64_imm(R1, 14),
            jgt_reg(R1, R3, 2),
            *ret(XDP_DROP),
            *ret(XDP_PASS),
        ],
        "xdp",
        {},
    ),
    "socket filter keeps all": (ret(0xFFFF), "socket_filter", {}),
    "tc program with skb_load_bytes": ([call(26), *ret(0)], "sched_cls", {}),
}


@pytest.mark.parametrize("name", sorted(LEGITIMATE))
def test_legitimate_programs_pass(name: str) -> None:
    insns, prog_type, refs = LEGITIMATE[name]
    assert verdict(list(insns), prog_type, map_refs=refs) == []


def small_map(name: str, map_type: int, max_entries: int = 4, value_size: int = 4) -> MapSpec:
    return MapSpec(name=name, type=map_type, key_size=4, value_size=value_size, max_entries=max_entries)


HOSTILE = [
    # (name, instructions or raw bytes, reason code, extra args)
    ("truncated stream", encode(ret(XDP_PASS))[:-3], "truncated", {}),
    ("empty program", b"", "empty", {}),
    ("ld_imm64 without its second half", [Insn(0x18, R1, 0, 0, 1), exit_()], "bad_ld_imm64", {}),
    ("jump past the end", [ja(5), *ret(XDP_PASS)], "jump_out_of_range", {}),
    ("jump backwards out of the program", [ja(-3), *ret(XDP_PASS)], "jump_out_of_range", {}),
    ("jump into an ld_imm64", [ja(1), *ld_imm64(R1, 7), *ret(XDP_PASS)], "jump_out_of_range", {}),
    ("over the length cap", [Insn(0xB7, R0, 0, 0, 0)] * 4096 + [exit_()], "too_long", {}),
    ("unknown opcode", [Insn(0xFF, 0, 0, 0, 0), *ret(XDP_PASS)], "bad_opcode", {}),
    ("register r11", [Insn(0xB7, 11, 0, 0, 0), *ret(XDP_PASS)], "bad_register", {}),
    ("falls off the end", [Insn(0xB7, R0, 0, 0, 0)], "falls_off_end", {}),
    ("tail call", [call(12), *ret(XDP_PASS)], "tail_call", {}),
    ("kfunc call", [call_kfunc(12345), *ret(XDP_PASS)], "kfunc", {}),
    ("bpf_probe_read_kernel", [call(113), *ret(XDP_PASS)], "helper_denied", {}),
    ("bpf_trace_printk", [call(6), *ret(XDP_PASS)], "helper_denied", {}),
    ("bpf_get_current_task", [call(35), *ret(XDP_PASS)], "helper_denied", {}),
    ("raw bpf_redirect", [call(23), *ret(XDP_PASS)], "helper_denied", {}),
    ("xdp helper in a socket filter", [call(44), *ret(0)], "helper_denied", {"prog_type": "socket_filter"}),
    ("map fd forged in the bytecode", [*ld_imm64(R1, 3, src=1), *ret(XDP_PASS)], "forged_map_ref", {}),
    ("kernel symbol", [*ld_imm64(R1, 99, src=3), *ret(XDP_PASS)], "kernel_symbol", {}),
    ("a map it does not declare", lookup_counter()[0], "forged_map_ref", {"map_refs": {3: "secrets"}}),
    ("prog array", ret(XDP_PASS), "map_type", {"maps": [small_map("jt", 3)]}),
    ("map in map", ret(XDP_PASS), "map_type", {"maps": [small_map("m", 12)]}),
    ("perf event array", ret(XDP_PASS), "map_type", {"maps": [small_map("p", 4)]}),
    ("too many maps", ret(XDP_PASS), "too_many_maps", {"maps": [small_map(f"m{i}", 2) for i in range(9)]}),
    ("too much map memory", ret(XDP_PASS), "map_memory", {"maps": [small_map("big", 1, 1 << 20, 1024)]}),
    ("unknown program type", ret(XDP_PASS), "prog_type", {"prog_type": "kprobe"}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "program", "code", "extra"), HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_programs_are_rejected_for_the_right_reason(name, program, code, extra) -> None:
    if isinstance(program, bytes):
        codes = [reason.code for reason in structure(program, Limits().max_insns)]
    else:
        codes = verdict(program, **extra)
    assert code in codes, f"{name}: {codes}"


def test_a_rejection_names_the_instruction() -> None:
    program = Program(insns=[call(113), *ret(XDP_PASS)], prog_type="xdp", maps=[], map_refs={})
    [reason] = check(program, Limits())
    assert reason.insn == 0 and "bpf_probe_read_kernel" in reason.message


def test_encoding_round_trips() -> None:
    insns = [*ld_imm64(R1, 0x1_0000_0002, src=1), stx_w(R10, R1, -8), *ret(XDP_PASS)]
    assert decode(encode(insns)) == insns
