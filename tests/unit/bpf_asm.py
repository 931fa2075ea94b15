"""A tiny eBPF assembler for tests: the instructions the corpus needs, by name."""

from verifier_service.bytecode import Insn

R0, R1, R2, R3, R4, R5, R6, R10 = 0, 1, 2, 3, 4, 5, 6, 10


def mov64_imm(dst: int, imm: int) -> Insn:
    return Insn(0xB7, dst, 0, 0, imm)


def mov64_reg(dst: int, src: int) -> Insn:
    return Insn(0xBF, dst, src, 0, 0)


def add64_imm(dst: int, imm: int) -> Insn:
    return Insn(0x07, dst, 0, 0, imm)


def ldx_w(dst: int, src: int, off: int) -> Insn:
    return Insn(0x61, dst, src, off, 0)


def stx_w(dst: int, src: int, off: int) -> Insn:
    return Insn(0x63, dst, src, off, 0)


def jgt_reg(dst: int, src: int, off: int) -> Insn:
    return Insn(0x2D, dst, src, off, 0)


def ja(off: int) -> Insn:
    return Insn(0x05, 0, 0, off, 0)


def call(helper: int) -> Insn:
    return Insn(0x85, 0, 0, 0, helper)


def call_kfunc(btf_id: int) -> Insn:
    return Insn(0x85, 0, 2, 0, btf_id)


def ld_imm64(dst: int, imm: int, src: int = 0) -> list[Insn]:
    return [Insn(0x18, dst, src, 0, imm & 0xFFFFFFFF), Insn(0, 0, 0, 0, imm >> 32)]


def exit_() -> Insn:
    return Insn(0x95, 0, 0, 0, 0)


def ret(value: int) -> list[Insn]:
    return [mov64_imm(R0, value), exit_()]
