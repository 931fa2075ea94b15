"""Reading a tenant's object file (`clang -O2 -target bpf`, libbpf conventions): one program's
instructions, the maps it declares (BTF-defined in `.maps`, or legacy `maps`), and which
instruction loads which map (from the relocations). Pure: bytes in, a Program or reasons out."""

import io
import struct

import msgspec
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from schemas.ebpf import MapSpec, Reason
from verifier_service import kernel_types
from verifier_service.btf import Btf, BtfError
from verifier_service.btf_ext import core_records, core_refusal, source_lines
from verifier_service.core import Relocation, relocate
from verifier_service.linking import SHF_EXECINSTR, is_global_data, link

EM_BPF = 247
ARRAY = 2  # BPF_MAP_TYPE_ARRAY
BPF_F_RDONLY_PROG = 0x80
LEGACY_MAP_DEF = struct.Struct("<IIIII")  # struct bpf_map_def: type, key, value, max_entries, flags


class ObjectError(ValueError):
    def __init__(self, reason: Reason):
        self.reason = reason
        super().__init__(reason.message)


class ElfProgram(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    section: str
    raw: bytes
    maps: list[MapSpec]
    map_refs: dict[int, str]
    license: str
    problems: list[Reason]  # references no loader honours, CO-RE relocations
    subprograms: list[str] = []  # the functions it reaches, appended after it
    lines: dict[int, str] = {}  # instruction -> its source line (btf_ext.source_lines)
    kernel_types: str = ""  # CO-RE relocated: the digest of the kernel types applied (kernel_types.py)


def _fail(code: str, message: str, insn: int | None = None) -> ObjectError:
    return ObjectError(Reason(code, message, insn))


def read_object(
    data: bytes, program: str | None, target: kernel_types.KernelTypes | None = None
) -> ElfProgram:
    """`target`: the kernel types CO-RE relocations are applied against (the running kernel's)."""
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] != "EM_BPF" and elf["e_machine"] != EM_BPF:
            raise _fail("malformed_elf", f"not an eBPF object (machine {elf['e_machine']})")
        symbols = elf.get_section_by_name(".symtab")
        if not isinstance(symbols, SymbolTableSection):
            raise _fail("malformed_elf", "the object has no symbol table")
        symbol = _program_symbol(elf, symbols, program)
        section = elf.get_section(symbol["st_shndx"])
        linked = link(elf, symbols, symbol)
        reached = set(linked.map_refs.values())
        maps = [m for m in [*_maps(elf, symbols), *_global_data(elf)] if m.name in reached]
        raw, problems, applied = linked.raw, list(linked.problems), ""
        if relocations := core_records(elf, linked.pieces):
            raw, core_problems, applied = _relocated(elf, raw, relocations, target or kernel_types.running())
            problems += core_problems
        lines = source_lines(elf, linked.pieces)
        license_section = elf.get_section_by_name("license")
        license_text = license_section.data().split(b"\0")[0].decode() if license_section else ""
    except (ELFError, BtfError, struct.error, UnicodeDecodeError, IndexError, KeyError) as exc:
        raise _fail("malformed_elf", f"cannot read the object: {exc}") from None
    return ElfProgram(
        name=symbol.name,
        section=section.name,
        raw=raw,
        maps=maps,
        map_refs=linked.map_refs,
        license=license_text,
        problems=problems,
        subprograms=linked.subprograms,
        lines=lines,
        kernel_types=applied,
    )


def _relocated(
    elf: ELFFile, raw: bytes, relocations: list[Relocation], target: kernel_types.KernelTypes | None
) -> tuple[bytes, list[Reason], str]:
    """The instructions with CO-RE relocations applied against `target`, refusals, its digest."""
    if target is None:
        return raw, [core_refusal(relocations[0].insn, "this kernel publishes no BTF")], ""
    code = bytearray(raw)
    local = elf.get_section_by_name(".BTF")
    assert local is not None  # core_records found relocations in it
    problems = relocate(code, relocations, Btf(local.data()), target.btf)
    return bytes(code), [core_refusal(index, why) for index, why in problems], target.digest


def _program_symbol(elf: ELFFile, symbols: SymbolTableSection, wanted: str | None):
    programs = [
        s
        for s in symbols.iter_symbols()
        if s["st_info"]["type"] == "STT_FUNC" and isinstance(s["st_shndx"], int) and s["st_size"] > 0
        and elf.get_section(s["st_shndx"])["sh_flags"] & SHF_EXECINSTR
        # `.text` holds subprograms (libbpf loads nothing from it as a program)
        and elf.get_section(s["st_shndx"]).name != ".text"
    ]  # fmt: skip
    names = sorted(s.name for s in programs)
    if wanted is None:
        if len(programs) != 1:
            raise _fail("program", f"the object holds programs {names}: name one with --program")
        return programs[0]
    for candidate in programs:
        if candidate.name == wanted:
            return candidate
    raise _fail("program", f"no program {wanted!r} in the object (it has {names})")


def _maps(elf: ELFFile, symbols: SymbolTableSection) -> list[MapSpec]:
    specs = []
    btf_section = elf.get_section_by_name(".BTF")
    if elf.get_section_by_name(".maps") is not None:
        if btf_section is None:
            raise _fail("malformed_elf", "maps in .maps need the object's BTF (build with -g)")
        btf = Btf(btf_section.data())
        for name, struct_id in btf.datasec(".maps"):
            fields = btf.map_fields(struct_id)
            specs.append(_spec(name, fields))
    legacy = elf.get_section_by_name("maps")
    if legacy is not None:
        index = elf.get_section_index("maps")
        for symbol in symbols.iter_symbols():
            if symbol["st_shndx"] == index and symbol["st_info"]["type"] == "STT_OBJECT":
                values = LEGACY_MAP_DEF.unpack_from(legacy.data(), symbol["st_value"])
                keys = ("type", "key_size", "value_size", "max_entries", "map_flags")
                specs.append(_spec(symbol.name, dict(zip(keys, values, strict=True))))
    return specs


def _spec(name: str, fields: dict[str, int]) -> MapSpec:
    """A missing size reads as 0, which the policy refuses with the map's name (after saying what
    is wrong with its type, which for map-in-map is the real problem)."""
    if "type" not in fields:
        raise _fail("map_shape", f"map {name!r} does not say its type")
    return MapSpec(
        name=name,
        type=fields["type"],
        key_size=fields.get("key_size", 0),
        value_size=fields.get("value_size", 0),
        max_entries=fields.get("max_entries", 0),
        flags=fields.get("map_flags", 0),
    )


def _global_data(elf: ELFFile) -> list[MapSpec]:
    """Each global-data section as libbpf maps it: a one-entry array of the section's size, with
    the section's bytes as its initial value; `.rodata` read-only to the program and frozen."""
    specs = []
    for section in elf.iter_sections():
        if not is_global_data(section.name) or not section["sh_size"]:
            continue
        rodata = section.name.startswith(".rodata")
        initial = b"" if section["sh_type"] == "SHT_NOBITS" else section.data()
        specs.append(
            MapSpec(
                name=section.name,
                type=ARRAY,
                key_size=4,
                value_size=section["sh_size"],
                max_entries=1,
                flags=BPF_F_RDONLY_PROG if rodata else 0,
                initial=initial.rstrip(b"\0") and initial,  # all zeros: nothing to write
                frozen=rodata,
            )
        )
    return specs
