"""eBPF instructions: decoding and the structural checks that come before any policy. Pure.

An instruction is 8 bytes: opcode, dst/src registers (4 bits each), a 16-bit offset and a 32-bit
immediate, little-endian (the only byte order the kernel's bpf target uses on our hosts).
`ld_imm64` takes two slots; its second half has opcode 0."""

import struct
from typing import NamedTuple

from schemas.ebpf import Reason

INSN_SIZE = 8
_INSN = struct.Struct("<BBhi")

# Instruction classes (low 3 bits) and the fields the checks read.
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
LD_IMM64 = 0x18
CALL = 0x85
EXIT = 0x95
JA = 0x05
ALU_OPS = {0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0}
JMP_OPS = {0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0xA0, 0xB0, 0xC0, 0xD0}  # + CALL, EXIT
SIZES = {0x00, 0x08, 0x10, 0x18}  # W, H, B, DW
MEM, ATOMIC = 0x60, 0xC0
LD_ABS_IND = {0x20, 0x40}  # legacy packet loads (socket filters)
MAX_REG = 10  # r10 is the read-only frame pointer

# ld_imm64 src_reg meanings (BPF_PSEUDO_*) and call src_reg meanings.
PSEUDO_MAP_FD, PSEUDO_MAP_VALUE, PSEUDO_BTF_ID, PSEUDO_FUNC, PSEUDO_MAP_IDX, PSEUDO_MAP_IDX_VALUE = (
    1,
    2,
    3,
    4,
    5,
    6,
)
CALL_HELPER, CALL_SUBPROGRAM, CALL_KFUNC = 0, 1, 2


class Insn(NamedTuple):
    code: int
    dst: int
    src: int
    off: int
    imm: int

    @property
    def cls(self) -> int:
        return self.code & 0x07


def decode(raw: bytes) -> list[Insn]:
    """Instructions of a stream whose length is a multiple of 8 (check_length says so first)."""
    return [
        Insn(code, regs & 0x0F, regs >> 4, off, imm)
        for code, regs, off, imm in _INSN.iter_unpack(raw[: len(raw) - len(raw) % INSN_SIZE])
    ]


def encode(insns: list[Insn]) -> bytes:
    return b"".join(_INSN.pack(i.code, i.dst | i.src << 4, i.off, i.imm) for i in insns)


def structure(raw: bytes, max_insns: int) -> list[Reason]:
    """Everything wrong with the stream's shape: length, opcodes, registers, ld_imm64 pairs, jumps.
    Stops at the first problem of the stream's length (nothing after it can be trusted)."""
    if not raw:
        return [Reason("empty", "the program has no instructions")]
    if len(raw) % INSN_SIZE:
        return [Reason("truncated", f"{len(raw)} bytes is not a whole number of 8-byte instructions")]
    count = len(raw) // INSN_SIZE
    if count > max_insns:
        return [Reason("too_long", f"{count} instructions, over the cap of {max_insns}")]
    insns = decode(raw)
    reasons: list[Reason] = []
    second_halves = _ld_imm64_pairs(insns, reasons)
    for index, insn in enumerate(insns):
        if index in second_halves:
            continue
        if problem := _opcode_problem(insn):
            reasons.append(Reason("bad_opcode", problem, index))
        elif insn.dst > MAX_REG or insn.src > MAX_REG:
            reasons.append(
                Reason("bad_register", f"register r{max(insn.dst, insn.src)} does not exist", index)
            )
        elif (target := jump_target(insn, index)) is not None and not _lands(target, count, second_halves):
            where = "outside the program" if not 0 <= target < count else "into the middle of an ld_imm64"
            reasons.append(Reason("jump_out_of_range", f"jump to instruction {target}, {where}", index))
    last = count - 1 - (1 if count >= 2 and count - 1 in second_halves else 0)
    if insns[last].code not in (EXIT, JA):
        reasons.append(Reason("falls_off_end", "the last instruction is neither exit nor a jump", last))
    return reasons


def _ld_imm64_pairs(insns: list[Insn], reasons: list[Reason]) -> set[int]:
    second_halves = set()
    index = 0
    while index < len(insns):
        if insns[index].code == LD_IMM64:
            after = insns[index + 1] if index + 1 < len(insns) else None
            if after is None or after.code or after.dst or after.src or after.off:
                reasons.append(Reason("bad_ld_imm64", "ld_imm64 without its second half", index))
            else:
                second_halves.add(index + 1)
            index += 2
        else:
            index += 1
    return second_halves


def _opcode_problem(insn: Insn) -> str | None:
    code, cls = insn.code, insn.cls
    if cls in (ALU, ALU64):
        return None if code & 0xF0 in ALU_OPS else f"unknown ALU operation {code:#04x}"
    if cls in (JMP, JMP32):
        if code in (CALL, EXIT) or (cls == JMP and code == JA):
            return None
        return None if code & 0xF0 in JMP_OPS and code & 0xF0 else f"unknown jump {code:#04x}"
    if cls == LD:
        if code == LD_IMM64 or (code & 0xE0 in LD_ABS_IND and code & 0x18 in SIZES and code & 0x18 != 0x18):
            return None
        return f"unknown load {code:#04x}"
    if cls in (LDX, ST, STX):
        mode, size = code & 0xE0, code & 0x18
        if mode == MEM and size in SIZES:
            return None
        if cls == STX and mode == ATOMIC and size in (0x00, 0x18):
            return None
        return f"unknown memory access {code:#04x}"
    return f"unknown opcode {code:#04x}"


def jump_target(insn: Insn, index: int) -> int | None:
    """Where a jump (or a call to a subprogram) goes; None for anything else."""
    if insn.cls not in (JMP, JMP32) or insn.code == EXIT:
        return None
    if insn.code == CALL:
        return index + 1 + insn.imm if insn.src == CALL_SUBPROGRAM else None
    if insn.code == JA and insn.cls == JMP32:
        return index + 1 + insn.imm  # gotol: the 32-bit offset lives in imm
    return index + 1 + insn.off


def _lands(target: int, count: int, second_halves: set[int]) -> bool:
    return 0 <= target < count and target not in second_halves
