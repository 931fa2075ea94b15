"""The least BTF the kernel needs to take a program with callbacks (`bpf_loop`,
`bpf_for_each_map_elem`): function info naming every subprogram (measured: without it, "missing
btf func_info"). Pure, and made from the instructions alone, so the verifier's worker and a node
build the same bytes and the kernel walks the same way for both.

One `int`, one prototype returning it, and a static FUNC per subprogram (static: the kernel
verifies each in its caller's context, as it does without BTF). Subprograms start where the
kernel finds them: at instruction 0 and at the target of every BPF-to-BPF call and callback
address (`ld_imm64` with BPF_PSEUDO_FUNC)."""

import struct

BTF_MAGIC, BTF_VERSION, HEADER_LEN = 0xEB9F, 1, 24
KIND_INT, KIND_FUNC, KIND_FUNC_PROTO = 1, 12, 13
INT_SIGNED = 1
FUNC_STATIC = 0
PSEUDO_CALL, PSEUDO_FUNC = 1, 4
CALL, LD_IMM64 = 0x85, 0x18
FUNC_INFO_REC_SIZE = 8  # struct bpf_func_info { __u32 insn_off; __u32 type_id; }


def subprogram_starts(raw: bytes) -> list[int]:
    starts = {0}
    for index, (code, regs, _off, imm) in enumerate(struct.iter_unpack("<BBhi", raw)):
        if (code == CALL and regs >> 4 == PSEUDO_CALL) or (code == LD_IMM64 and regs >> 4 == PSEUDO_FUNC):
            starts.add(index + imm + 1)
    return sorted(starts)


def needs_func_info(raw: bytes) -> bool:
    """A callback's address is loaded: the kernel refuses it without function info."""
    return any(
        code == LD_IMM64 and regs >> 4 == PSEUDO_FUNC
        for code, regs, _off, _imm in struct.iter_unpack("<BBhi", raw)
    )


def func_info(raw: bytes) -> tuple[bytes, bytes, int]:
    """(the BTF blob, the func_info records, how many)."""
    starts = subprogram_starts(raw)
    strings = bytearray(b"\0int\0")
    types = struct.pack("<III", 1, KIND_INT << 24, 4) + struct.pack("<I", INT_SIGNED << 24 | 32)  # [1] int
    types += struct.pack("<III", 0, KIND_FUNC_PROTO << 24, 1)  # [2] int (void)
    records = b""
    for number, start in enumerate(starts):
        name_off = len(strings)
        strings += f"f{number}".encode() + b"\0"
        types += struct.pack("<III", name_off, KIND_FUNC << 24 | FUNC_STATIC, 2)  # [3 + number]
        records += struct.pack("<II", start, 3 + number)
    header = struct.pack(
        "<HBBIIIII", BTF_MAGIC, BTF_VERSION, 0, HEADER_LEN, 0, len(types), len(types), len(strings)
    )
    return header + types + bytes(strings), records, len(starts)
