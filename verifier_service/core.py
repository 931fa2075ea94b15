"""CO-RE: relocating a program's compile-time field offsets, sizes and existence checks against a
kernel's own types (its BTF, /sys/kernel/btf/vmlinux), as libbpf does at load. Pure: the
object's BTF, the relocation records, the instructions and the target BTF in; the patched
instructions and refusals out.

A record says "instruction I holds <kind> of the access A (`0:2:1`: index 0 of the root type,
its member 2, that member's member 1) into local type T". The same path is followed in the
target by member *names* (through anonymous structs and unions), from every target type of T's
kind whose name is T's without a `___suffix` (`iphdr___mine` is `iphdr`); candidates that
disagree, a bitfield, a field whose size changed under a load, or an instruction that does not
hold the local value are refused, never loaded with a guess. Supported: field byte offset, byte
size and existence, type existence and size, enum value existence and value (the kinds clang
emits for field accesses, `bpf_core_field_exists`, `bpf_core_type_size`, `bpf_core_enum_value`)."""

import struct
from typing import NamedTuple

from verifier_service.btf import KIND_ARRAY, KIND_ENUM, KIND_ENUM64, KIND_STRUCT, KIND_UNION, Btf
from verifier_service.bytecode import ALU, ALU64, INSN_SIZE, LD_IMM64, LDX, ST, STX

FIELD_BYTE_OFFSET, FIELD_BYTE_SIZE, FIELD_EXISTS, FIELD_SIGNED, FIELD_LSHIFT_U64, FIELD_RSHIFT_U64 = range(6)
TYPE_EXISTS, TYPE_SIZE, ENUMVAL_EXISTS, ENUMVAL_VALUE = 8, 9, 10, 11
SUPPORTED = {*range(6), TYPE_EXISTS, TYPE_SIZE, ENUMVAL_EXISTS, ENUMVAL_VALUE}  # not type ids, not matches
EXISTENCE = {FIELD_EXISTS, TYPE_EXISTS, ENUMVAL_EXISTS}


class CoreError(ValueError):
    pass


class Relocation(NamedTuple):
    insn: int  # the instruction, in the linked program
    type_id: int  # the local root type
    access: str
    kind: int


class _Field(NamedTuple):
    bit_offset: int
    type_id: int  # the field's (or element's) type
    bits: int  # a bitfield's width; 0: not a bitfield


# A step of an access path, as the target is matched: an array index, or a member by name
_Step = tuple[str, int | str]


def essential_name(name: str) -> str:
    return name.split("___", 1)[0]


def relocate(
    code: bytearray, relocations: list[Relocation], local: Btf, target: Btf
) -> list[tuple[int, str]]:
    """Patch each relocated instruction of `code` in place; (instruction, why) of those that
    cannot be (their instructions are left as compiled, and the program must be refused)."""
    problems = []
    for relocation in relocations:
        try:
            _relocate(code, relocation, local, target)
        except (CoreError, IndexError, KeyError, ValueError) as exc:
            problems.append((relocation.insn, str(exc)))
    return problems


def _relocate(code: bytearray, relocation: Relocation, local: Btf, target: Btf) -> None:
    if relocation.kind not in SUPPORTED:
        raise CoreError(f"relocation kind {relocation.kind} (type ids, type matches) is not supported")
    expected, steps = _local(local, relocation)
    found = _target(target, relocation, local, steps)
    if found is None:
        raise CoreError(f"this kernel has no {_what(local, relocation)}")
    sizes = None
    if relocation.kind == FIELD_BYTE_OFFSET:  # the load keeps its size: the field's must too
        as_size = relocation._replace(kind=FIELD_BYTE_SIZE)
        sizes = (_local(local, as_size)[0], _target(target, as_size, local, steps) or 0)
    _patch(code, relocation.insn, expected, found, relocation, sizes)


def _local(btf: Btf, relocation: Relocation) -> tuple[int, list[_Step]]:
    """The value the object was compiled with, and the path to match in the target."""
    root = btf.resolve(relocation.type_id)
    kind = relocation.kind
    if kind in (TYPE_EXISTS, TYPE_SIZE):
        return (1 if kind == TYPE_EXISTS else btf.size_of(root)), []
    if kind in (ENUMVAL_EXISTS, ENUMVAL_VALUE):
        name, value = btf.enumerators(root)[int(relocation.access)]
        return (1 if kind == ENUMVAL_EXISTS else value), [("enumerator", name)]
    path = [int(part) for part in relocation.access.split(":")]
    current, bits, width = root, path[0] * 8 * btf.size_of(root), 0
    steps: list[_Step] = [("index", path[0])]
    for index in path[1:]:
        if btf.types[current][0] == KIND_ARRAY:
            element, _count = btf.array(current)
            bits += index * 8 * btf.size_of(element)
            current = btf.resolve(element)
            steps.append(("index", index))
            continue
        member = btf.members(current)[index]
        bits += member.bit_offset
        width = member.bits
        current = btf.resolve(member.type_id)
        if member.name:  # an anonymous struct or union is found through in the target
            steps.append(("member", member.name))
    return _field_value(btf, kind, _Field(bits, current, width), relocation), steps


def _target(target: Btf, relocation: Relocation, local: Btf, steps: list[_Step]) -> int | None:
    """The relocation's value against the target's types (existence kinds: 0 when absent)."""
    values = set()
    for root in _candidates(local, relocation.type_id, target):
        value = _follow(target, root, relocation, steps)
        if value is not None:
            values.add(value)
    if len(values) > 1:
        raise CoreError(f"the kernel's types disagree on {_what(local, relocation)} ({sorted(values)})")
    if values:
        return values.pop()
    return 0 if relocation.kind in EXISTENCE else None


def _candidates(local: Btf, type_id: int, target: Btf) -> list[int]:
    root = local.resolve(type_id)
    kind, name = local.types[root][0], essential_name(local.names[root])
    if not name:
        raise CoreError("a relocation against an anonymous type")
    if kind in (KIND_STRUCT, KIND_UNION):
        family = {KIND_STRUCT, KIND_UNION}
    elif kind in (KIND_ENUM, KIND_ENUM64):
        family = {KIND_ENUM, KIND_ENUM64}
    else:
        family = {kind}
    return [t for t in target.named(name) if target.types[t][0] in family]


def _follow(btf: Btf, root: int, relocation: Relocation, steps: list[_Step]) -> int | None:
    kind = relocation.kind
    if kind in (TYPE_EXISTS, TYPE_SIZE):
        return 1 if kind == TYPE_EXISTS else btf.size_of(root)
    if kind in (ENUMVAL_EXISTS, ENUMVAL_VALUE):
        values = dict(btf.enumerators(root))
        name = steps[0][1]
        if name not in values:
            return None
        return 1 if kind == ENUMVAL_EXISTS else values[name]  # type: ignore[index]
    current, bits, width = root, 0, 0
    for number, (what, step) in enumerate(steps):
        if what == "index":
            size = btf.size_of(current)
            if number:  # an array's element (the first index counts whole root types)
                if btf.types[current][0] != KIND_ARRAY:
                    return None
                element, count = btf.array(current)
                if count and int(step) >= count:
                    return None
                size, current = btf.size_of(element), btf.resolve(element)
            bits += int(step) * 8 * size
            continue
        found = _member(btf, current, str(step))
        if found is None:
            return None
        bits += found.bit_offset
        current, width = btf.resolve(found.type_id), found.bits
    return _field_value(btf, kind, _Field(bits, current, width), relocation)


def _member(btf: Btf, type_id: int, name: str) -> _Field | None:
    """The member called `name`, looking through anonymous structs and unions."""
    if btf.types[type_id][0] not in (KIND_STRUCT, KIND_UNION):
        return None
    for member in btf.members(type_id):
        if member.name == name:
            return _Field(member.bit_offset, member.type_id, member.bits)
        if not member.name:
            inner = _member(btf, btf.resolve(member.type_id), name)
            if inner is not None:
                return _Field(member.bit_offset + inner.bit_offset, inner.type_id, inner.bits)
    return None


def _field_value(btf: Btf, kind: int, field: _Field, relocation: Relocation) -> int:
    """A field's offset, size, signedness or shifts, as a load of it needs them: a bitfield is
    read by the smallest aligned load (of at least its type's size) that holds it, then shifted
    left and right in 64 bits (little-endian)."""
    if kind == FIELD_EXISTS:
        return 1
    if kind == FIELD_SIGNED:
        return int(btf.signed(field.type_id))
    size = btf.size_of(field.type_id)
    if not field.bits:
        if field.bit_offset % 8:
            raise CoreError(f"{relocation.access} is not at a whole byte")
        offset, width = field.bit_offset // 8, size * 8
    else:
        width, offset = field.bits, field.bit_offset // 8 // size * size
        while field.bit_offset + width - offset * 8 > size * 8:
            if size >= 8:
                raise CoreError(f"{relocation.access} is a bitfield no single load holds")
            size *= 2
            offset = field.bit_offset // 8 // size * size
    return {
        FIELD_BYTE_OFFSET: offset,
        FIELD_BYTE_SIZE: size,
        FIELD_LSHIFT_U64: 64 - (field.bit_offset + width - offset * 8),
        FIELD_RSHIFT_U64: 64 - width,
    }[kind]


def _patch(
    code: bytearray,
    index: int,
    expected: int,
    found: int,
    relocation: Relocation,
    sizes: tuple[int, int] | None = None,  # a load's (local, target) field size
) -> None:
    at = index * INSN_SIZE
    opcode = code[at]
    cls = opcode & 0x07
    if opcode == LD_IMM64:
        low, high = struct.unpack_from("<i", code, at + 4)[0], struct.unpack_from("<i", code, at + 12)[0]
        if (low & 0xFFFFFFFF | (high & 0xFFFFFFFF) << 32) != expected & 0xFFFFFFFFFFFFFFFF:
            raise CoreError(f"instruction {index} does not hold the value its relocation says")
        struct.pack_into("<I", code, at + 4, found & 0xFFFFFFFF)
        struct.pack_into("<I", code, at + 12, (found >> 32) & 0xFFFFFFFF)
    elif cls in (ALU, ALU64) and not opcode & 0x08:  # an immediate: r1 += 14, r0 = 1
        if struct.unpack_from("<i", code, at + 4)[0] != expected:
            raise CoreError(f"instruction {index} does not hold the value its relocation says")
        struct.pack_into("<i", code, at + 4, found)
    elif cls in (LDX, ST, STX) and relocation.kind == FIELD_BYTE_OFFSET:
        if struct.unpack_from("<h", code, at + 2)[0] != expected:
            raise CoreError(f"instruction {index} does not hold the offset its relocation says")
        if sizes is not None and sizes[0] != sizes[1]:
            raise CoreError(f"the field is {sizes[1]} bytes on this kernel, {sizes[0]} in the object")
        if not -(1 << 15) <= found < 1 << 15:
            raise CoreError(f"offset {found} does not fit instruction {index}")
        struct.pack_into("<h", code, at + 2, found)
    else:
        raise CoreError(f"instruction {index} (opcode {opcode:#x}) cannot take a relocated value")


def _name(btf: Btf, type_id: int) -> str:
    return btf.names[btf.resolve(type_id)] or f"#{type_id}"


def _what(btf: Btf, relocation: Relocation) -> str:
    return f"{_name(btf, relocation.type_id)} with {relocation.access}"
