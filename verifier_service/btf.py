"""Just enough of BTF (the kernel's type format, in an object's `.BTF` section) to read the map
definitions libbpf-style programs declare in `.maps`. Pure: bytes in, map specs out.

A `.maps` definition is a variable of an anonymous struct whose members encode the map's shape in
their types: `__uint(type, BPF_MAP_TYPE_ARRAY)` is `int (*type)[2]` (the number is an array's
length), `__type(key, __u32)` is `__u32 *key` (the size is the pointee's)."""

import struct
from typing import NamedTuple

MAGIC = 0xEB9F
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 13, 14, 15, 17, 18, 19
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}
# Bytes of kind-specific data after each type's 12-byte head: fixed, or per vlen entry.
_FIXED = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_PER_ENTRY = {
    KIND_STRUCT: 12,
    KIND_UNION: 12,
    KIND_ENUM: 8,
    KIND_FUNC_PROTO: 8,
    KIND_DATASEC: 12,
    KIND_ENUM64: 12,
}


class BtfError(ValueError):
    pass


class Member(NamedTuple):
    name: str
    bit_offset: int
    type_id: int
    bits: int  # a bitfield's width; 0: not a bitfield


class Btf:
    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BtfError("the .BTF section is shorter than its header")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", data
        )
        if magic != MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x}")
        base = hdr_len
        self._types = data[base + type_off : base + type_off + type_len]
        self._strings = data[base + str_off : base + str_off + str_len]
        self.types: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]  # (kind, vlen, size_or_type, offset)
        self.names: list[str] = [""]
        self._kind_flags: list[bool] = [False]
        self._by_name: dict[str, list[int]] | None = None
        self._index()

    def _index(self) -> None:
        at = 0
        while at < len(self._types):
            if at + 12 > len(self._types):
                raise BtfError("truncated BTF type")
            name_off, info, size_or_type = struct.unpack_from("<III", self._types, at)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            self.types.append((kind, vlen, size_or_type, at + 12))
            self.names.append(self.string(name_off))
            self._kind_flags.append(bool(info >> 31))
            at += 12 + _FIXED.get(kind, 0) + _PER_ENTRY.get(kind, 0) * vlen

    def string(self, offset: int) -> str:
        end = self._strings.find(b"\0", offset)
        return self._strings[offset : end if end >= 0 else None].decode(errors="replace")

    def _entries(self, type_id: int, fmt: str) -> list[tuple]:
        _kind, vlen, _, at = self.types[type_id]
        size = struct.calcsize(fmt)
        return [struct.unpack_from(fmt, self._types, at + i * size) for i in range(vlen)]

    def named(self, name: str) -> list[int]:
        """The types called `name`, or `name___anything` (CO-RE's flavours)."""
        if self._by_name is None:
            self._by_name = {}
            for type_id, full in enumerate(self.names):
                if full:
                    self._by_name.setdefault(full.split("___", 1)[0], []).append(type_id)
        return self._by_name.get(name, [])

    def members(self, type_id: int) -> list[Member]:
        """A struct's or union's members; with the kind flag, offsets hold a bitfield's size."""
        flagged = self._kind_flags[type_id]
        out = []
        for name_off, member_type, offset in self._entries(type_id, "<III"):
            bits, size = (offset & 0xFFFFFF, offset >> 24) if flagged else (offset, 0)
            out.append(Member(self.string(name_off), bits, member_type, size))
        return out

    def array(self, type_id: int) -> tuple[int, int]:
        """(element type, element count) of an array type."""
        element, _index, count = struct.unpack_from("<III", self._types, self.types[type_id][3])
        return element, count

    def signed(self, type_id: int) -> bool:
        """An int type marked signed (BTF_INT_SIGNED), or a signed enum (the kind flag)."""
        type_id = self.resolve(type_id)
        kind, _, _, at = self.types[type_id]
        if kind == KIND_INT:
            return bool(struct.unpack_from("<I", self._types, at)[0] >> 24 & 1)
        return kind in (KIND_ENUM, KIND_ENUM64) and self._kind_flags[type_id]

    def enumerators(self, type_id: int) -> list[tuple[str, int]]:
        kind = self.types[type_id][0]
        if kind == KIND_ENUM:
            return [(self.string(n), v) for n, v in self._entries(type_id, "<Ii")]
        if kind == KIND_ENUM64:
            return [(self.string(n), lo | hi << 32) for n, lo, hi in self._entries(type_id, "<III")]
        return []

    def resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        for _ in range(64):
            kind, _, target, _ = self.types[type_id]
            if kind not in _MODIFIERS:
                return type_id
            type_id = target
        raise BtfError("BTF type chain too long")

    def size_of(self, type_id: int) -> int:
        type_id = self.resolve(type_id)
        kind, _, size_or_type, at = self.types[type_id]
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _index, count = struct.unpack_from("<III", self._types, at)
            return count * self.size_of(elem)
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64):
            return size_or_type
        raise BtfError(f"BTF type {type_id} (kind {kind}) has no size")

    def datasec(self, name: str) -> list[tuple[str, int]]:
        """(variable name, its type id) of each variable in section `name`."""
        for type_id, (kind, _vlen, _size, _at) in enumerate(self.types):
            if kind == KIND_DATASEC and self.names[type_id] == name:
                out = []
                for var_type, _offset, _size in self._entries(type_id, "<III"):
                    out.append((self.names[var_type], self.types[var_type][2]))
                return out
        return []

    def map_fields(self, struct_id: int) -> dict[str, int]:
        """A `.maps` struct's members as numbers: `type`, `max_entries`, `key_size`, ... (from the
        array lengths of `__uint`s) and `key`/`value` (from the sizes of `__type`s' pointees)."""
        struct_id = self.resolve(struct_id)
        if self.types[struct_id][0] != KIND_STRUCT:
            raise BtfError("a .maps variable is not a struct")
        fields = {}
        for name_off, member_type, _offset in self._entries(struct_id, "<III"):
            name = self.string(name_off)
            kind, _, pointee, _ = self.types[self.resolve(member_type)]
            if kind != KIND_PTR:
                continue  # e.g. map-in-map's `__array(values, ...)`: its `type` already says what it is
            target = self.resolve(pointee)
            if name in ("key", "value"):
                fields[name + "_size"] = self.size_of(target)
            elif self.types[target][0] == KIND_ARRAY:
                fields[name] = struct.unpack_from("<III", self._types, self.types[target][3])[2]
            else:
                raise BtfError(f"map member {name!r} is not a number (__uint)")
        return fields
