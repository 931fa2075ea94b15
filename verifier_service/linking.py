"""Linking one program out of a tenant's object, as libbpf does before a load: the program's own
instructions, then every subprogram it reaches (`__noinline` functions and `bpf_loop` /
`bpf_for_each_map_elem` callbacks, which clang leaves in `.text`), with calls and callback
addresses pointed at where those land; and every map and global-data reference it makes. Only
what the named program reaches counts: a sibling program's maps are not its maps. Pure.

Measured on clang 14's output: a call into `.text` is relocated (R_BPF_64_32) against the section
with `imm` = target/8 - 1; a call between functions of one section is not relocated (`imm` is
already relative); a callback's address is an ld_imm64 relocated (R_BPF_64_64) against `.text`
with `imm` = its byte offset; a global is an ld_imm64 relocated against the variable (or its
section, `imm` then being the offset)."""

import struct

import msgspec
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import Symbol, SymbolTableSection

from schemas.ebpf import Reason
from verifier_service.bytecode import CALL, CALL_SUBPROGRAM, INSN_SIZE, LD_IMM64

R_BPF_64_64, R_BPF_64_32 = 1, 10
SHF_EXECINSTR = 0x4
MAX_SUBPROGRAMS = 256  # the kernel's own limit (BPF_MAX_SUBPROGS)
_INSN = struct.Struct("<BBhi")


def is_global_data(section_name: str) -> bool:
    """Sections libbpf turns into maps: `.data`, `.bss`, `.rodata` and their `.name` variants."""
    return any(section_name == s or section_name.startswith(s + ".") for s in (".data", ".bss", ".rodata"))


class Linked(msgspec.Struct, frozen=True, kw_only=True):
    raw: bytes  # the program, then each subprogram it reaches
    map_refs: dict[int, str]  # ld_imm64 index -> map name (a global-data section's name for globals)
    subprograms: list[str]  # reached, in the order appended
    problems: list[Reason]
    # (section index, byte offset, byte size) of each piece, in order: for CO-RE and line info
    pieces: list[tuple[int, int, int]]


class _Function(msgspec.Struct, frozen=True):
    section: int
    start: int  # byte offset in its section
    size: int
    name: str


class _Linker:
    def __init__(self, elf: ELFFile, symbols: SymbolTableSection):
        self.elf, self.symbols = elf, symbols
        self.code = bytearray()
        self.base: dict[tuple[int, int], int] = {}  # (section, start) -> first index in code
        self.order: list[_Function] = []
        self.fixups: list[tuple[int, int, int]] = []  # (index in code, target section, byte offset)
        self.map_refs: dict[int, str] = {}
        self.problems: list[Reason] = []
        self._functions: dict[int, list[_Function]] = {}
        self.map_sections = {
            elf.get_section_index(n) for n in (".maps", "maps") if elf.get_section_by_name(n)
        }

    def functions_of(self, section: int) -> list[_Function]:
        if section not in self._functions:
            self._functions[section] = sorted(
                (
                    _Function(section, s["st_value"], s["st_size"], s.name)
                    for s in self.symbols.iter_symbols()
                    if s["st_shndx"] == section and s["st_info"]["type"] == "STT_FUNC" and s["st_size"] > 0
                ),
                key=lambda f: f.start,
            )
        return self._functions[section]

    def function_at(self, section: int, offset: int) -> _Function | None:
        for function in self.functions_of(section):
            if function.start <= offset < function.start + function.size:
                return function
        return None

    def include(self, function: _Function) -> None:
        key = (function.section, function.start)
        if key in self.base:
            return
        if len(self.order) > MAX_SUBPROGRAMS:
            raise _TooMany()
        self.base[key] = len(self.code) // INSN_SIZE
        self.order.append(function)
        data = self.elf.get_section(function.section).data()
        self.code += data[function.start : function.start + function.size]

    def relocations_of(self, section: int) -> dict[int, tuple[int, Symbol]]:
        """Byte offset in `section` -> (relocation type, symbol)."""
        name = self.elf.get_section(section).name
        table = self.elf.get_section_by_name(".rel" + name)
        if not isinstance(table, RelocationSection):
            return {}
        return {
            r["r_offset"]: (r["r_info_type"], self.symbols.get_symbol(r["r_info_sym"]))
            for r in table.iter_relocations()
        }

    def walk(self, function: _Function) -> None:
        """Read `function`'s references, including (and later walking) what it reaches."""
        relocations = self.relocations_of(function.section)
        first = self.base[(function.section, function.start)]
        for n in range(function.size // INSN_SIZE):
            offset = function.start + n * INSN_SIZE
            index = first + n
            code, regs, _off, imm = _INSN.unpack_from(self.code, index * INSN_SIZE)
            relocation = relocations.get(offset)
            if relocation is not None:
                self.resolve(index, code, imm, *relocation)
            elif code == CALL and regs >> 4 == CALL_SUBPROGRAM:  # within the section: relative
                self.reach(index, function.section, offset + (imm + 1) * INSN_SIZE)

    def resolve(self, index: int, code: int, imm: int, kind: int, symbol: Symbol) -> None:
        shndx = symbol["st_shndx"]
        target = self.elf.get_section(shndx) if isinstance(shndx, int) and shndx else None
        executable = target is not None and target["sh_flags"] & SHF_EXECINSTR
        where = symbol.name or (target.name if target is not None else "?")
        if code == CALL and kind == R_BPF_64_32 and executable:
            self.reach(index, shndx, symbol["st_value"] + (imm + 1) * INSN_SIZE)
        elif code == LD_IMM64 and kind == R_BPF_64_64 and executable:
            self._set(index, regs_src=4)  # BPF_PSEUDO_FUNC: the kernel takes imm as relative
            self.reach(index, shndx, symbol["st_value"] + imm)  # loaded with BTF func info: prog_btf.py
        elif code == LD_IMM64 and shndx in self.map_sections:
            self.map_refs[index] = symbol.name
        elif code == LD_IMM64 and target is not None and is_global_data(target.name):
            # The node relocates it as BPF_PSEUDO_MAP_VALUE: first half the map, second the offset.
            struct.pack_into("<i", self.code, (index + 1) * INSN_SIZE + 4, symbol["st_value"] + imm)
            struct.pack_into("<i", self.code, index * INSN_SIZE + 4, 0)
            self.map_refs[index] = target.name
        elif not isinstance(shndx, int) or not shndx:
            self.problems.append(
                Reason(
                    "kernel_symbol",
                    f"refers to {where!r}, which the object does not define (an extern, kfunc or "
                    "ksym): kernel symbols are not offered to tenants",
                    index,
                )
            )
        else:
            self.problems.append(
                Reason("relocation", f"a relocation against {where!r} that no loader honours", index)
            )

    def _set(self, index: int, regs_src: int) -> None:
        at = index * INSN_SIZE + 1
        self.code[at] = (self.code[at] & 0x0F) | regs_src << 4

    def reach(self, index: int, section: int, offset: int) -> None:
        function = self.function_at(section, offset)
        if function is None:
            name = self.elf.get_section(section).name
            self.problems.append(
                Reason("bad_call", f"calls offset {offset} of {name}, which is inside no function", index)
            )
            return
        self.include(function)
        self.fixups.append((index, section, offset))


class _TooMany(Exception):
    pass


def link(elf: ELFFile, symbols: SymbolTableSection, program: Symbol) -> Linked:
    linker = _Linker(elf, symbols)
    main = _Function(program["st_shndx"], program["st_value"], program["st_size"], program.name)
    linker.include(main)
    try:
        walked = 0
        while walked < len(linker.order):  # include() appends as walking reaches more
            linker.walk(linker.order[walked])
            walked += 1
    except _TooMany:
        reason = Reason("too_many_subprograms", f"reaches over {MAX_SUBPROGRAMS} subprograms")
        return Linked(raw=b"", map_refs={}, subprograms=[], problems=[reason], pieces=[])
    for index, section, offset in linker.fixups:
        function = linker.function_at(section, offset)
        assert function is not None  # reach() recorded only those it found
        target = linker.base[(section, function.start)] + (offset - function.start) // INSN_SIZE
        struct.pack_into("<i", linker.code, index * INSN_SIZE + 4, target - index - 1)
    return Linked(
        raw=bytes(linker.code),
        map_refs=linker.map_refs,
        subprograms=[f.name for f in linker.order[1:]],
        problems=linker.problems,
        pieces=[(f.section, f.start, f.size) for f in linker.order],
    )
