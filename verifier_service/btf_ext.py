"""`.BTF.ext`: what clang records per instruction beside the code (func info, line info, CO-RE
relocations): line info names refusals' source lines; CO-RE records say "this offset is the
compile-time guess, fix it for the running kernel" (core.py applies them). Pure.

Layout (libbpf's btf.h): a header (magic 0xeB9F, version, flags, hdr_len, then offset/length
pairs of func info, line info and, when hdr_len >= 32, CO-RE relocations, relative to the header's
end); each part is a record size, then per section: its name (an offset into .BTF's strings),
a count, and that many records. A CO-RE record is (insn byte offset, type id, access string, kind)."""

import struct
from collections.abc import Iterator

from elftools.elf.elffile import ELFFile

from schemas.ebpf import Reason
from verifier_service.btf import MAGIC, Btf, BtfError
from verifier_service.bytecode import INSN_SIZE
from verifier_service.core import Relocation

_HEADER = struct.Struct("<HBBIIIIIIII")


def _part(ext: bytes, which: int) -> list[tuple[int, list[bytes]]]:
    """(section-name offset, records) per section of part `which` (0 func, 1 line, 2 CO-RE)."""
    if len(ext) < 24:
        raise BtfError(".BTF.ext is shorter than its header")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", ext)
    if magic != MAGIC:
        raise BtfError(f"bad .BTF.ext magic {magic:#x}")
    pairs = struct.unpack_from("<" + "I" * ((min(hdr_len, 32) - 8) // 4), ext, 8)
    if 2 * which + 1 >= len(pairs):
        return []
    offset, length = pairs[2 * which], pairs[2 * which + 1]
    data = ext[hdr_len + offset : hdr_len + offset + length]
    if not data:
        return []
    (record_size,) = struct.unpack_from("<I", data)
    if record_size < 4:
        raise BtfError(f".BTF.ext record size {record_size} is too small")
    at, out = 4, []
    while at + 8 <= len(data):
        name_off, count = struct.unpack_from("<II", data, at)
        at += 8
        end = at + count * record_size
        if end > len(data):
            raise BtfError(".BTF.ext section runs past its part")
        out.append((name_off, [data[i : i + record_size] for i in range(at, end, record_size)]))
        at = end
    return out


def _bases(elf: ELFFile, pieces: list[tuple[int, int, int]]) -> list[tuple[str, int, int, int]]:
    """(section name, byte start, byte size, first index in the linked program) per piece."""
    bases, at = [], 0
    for section, start, size in pieces:
        bases.append((elf.get_section(section).name, start, size, at))
        at += size // INSN_SIZE
    return bases


def _records(elf: ELFFile, pieces: list[tuple[int, int, int]], part: int) -> Iterator[tuple[Btf, int, bytes]]:
    """(the object's BTF, linked instruction index, the record) for each record of `part` (1
    line info, 2 CO-RE) that falls in `pieces` (section index, byte start, byte size: the
    linked program's parts, in order)."""
    ext_section, btf_section = elf.get_section_by_name(".BTF.ext"), elf.get_section_by_name(".BTF")
    if ext_section is None or btf_section is None:
        return
    btf = Btf(btf_section.data())
    bases = _bases(elf, pieces)
    for name_off, records in _part(ext_section.data(), part):
        section_name = btf.string(name_off)
        for record in records:
            (insn_off,) = struct.unpack_from("<I", record)
            for name, start, size, base in bases:
                if name == section_name and start <= insn_off < start + size:
                    yield btf, base + (insn_off - start) // INSN_SIZE, record


def source_lines(elf: ELFFile, pieces: list[tuple[int, int, int]]) -> dict[int, str]:
    """Linked instruction index -> `file:line: source text`, for each instruction clang recorded
    a line for (`-g`: BTF line info, a record (insn byte offset, file, line text, line << 10 |
    column)); later instructions of the same line have none of their own (see line_of)."""
    lines = {}
    for btf, index, record in _records(elf, pieces, 1):
        _insn_off, file_off, line_off, line_col = struct.unpack_from("<IIII", record)
        file = btf.string(file_off).rsplit("/", 1)[-1]
        lines[index] = f"{file}:{line_col >> 10}: {' '.join(btf.string(line_off).split())}"
    return lines


def line_of(lines: dict[int, str], index: int) -> str | None:
    """The source line instruction `index` was compiled from: the nearest record at or before it."""
    earlier = [at for at in lines if at <= index]
    return lines[max(earlier)] if earlier else None


def core_records(elf: ELFFile, pieces: list[tuple[int, int, int]]) -> list[Relocation]:
    """The CO-RE relocations of `pieces`, at their instructions in the linked program."""
    found = []
    for btf, index, record in _records(elf, pieces, 2):
        _insn_off, type_id, access_off, kind = struct.unpack_from("<IIII", record)
        found.append(Relocation(index, type_id, btf.string(access_off), kind))
    return found


def core_refusal(index: int, why: str) -> Reason:
    return Reason(
        "core_relocation",
        f"a CO-RE relocation cannot be applied against this kernel's types: {why}. For packet "
        "headers the UAPI headers (<linux/if_ether.h>, <linux/ip.h>, ...) need no relocation",
        index,
    )
