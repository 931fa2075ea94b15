"""What the kernel's log says of a frame's stack, byte by byte (verifier_log.py reads the log):
which bytes were written with a number, which hold part of a spilled pointer, which are unknown
scalars written byte-wise (STACK_MISC). Pure."""

import re


class Frame:
    """One frame's registers (number -> the kernel's text for it) and stack slots (offset of the
    slot's lowest byte, a negative multiple of 8 -> a spilled register's text or 8 byte kinds)."""

    __slots__ = ("regs", "stack")

    def __init__(self) -> None:
        self.regs: dict[int, str] = {}
        self.stack: dict[int, str] = {}


_SCALAR = re.compile(r"^P?(?:-?\d+|0x[0-9a-f]+|scalar(?:\(.*\))?)$", re.S)
_BYTE_KINDS = re.compile(r"^[?rm0dif]{8}$")  # invalid, spill, misc, zero, dynptr, iter, irq flag
# A slot partly a spilled number (a 32-bit spill): its high bytes' kinds, then the register
# (6.18 prints `fp-8=mmmmscalar()`); only numbers are spilled narrower than 8 bytes.
_PART_SPILLED = re.compile(r"^([?rm0dif]{1,7})(P?(?:-?\d+|0x[0-9a-f]+|scalar(?:\(.*\))?))$", re.S)
WRITTEN, MIXED = "written", "mixed"


def kind(value: str | None) -> str:
    """'scalar', the pointer's type ('ctx', 'pkt', 'map_value', 'fp', ...), or 'unknown'."""
    if value is None:
        return "unknown"
    if _SCALAR.match(value):
        return "scalar"
    return re.split(r"[(\[\-0-9]", value, maxsplit=1)[0] or "unknown"


def stack_bytes(stack: dict[int, str]) -> dict[int, str]:
    """Address (fp-relative) -> WRITTEN, or the type of the pointer spilled there; bytes never
    written are absent. A slot's text holds a spilled register or one kind per byte, the slot's
    highest address first (`0000????`: fp-1..fp-4 zero, fp-5..fp-8 unwritten)."""
    found: dict[int, str] = {}
    for base, slot in stack.items():
        if _BYTE_KINDS.match(slot):
            found.update((base + 7 - at, WRITTEN) for at, char in enumerate(slot) if char != "?")
        elif part := _PART_SPILLED.match(slot):
            kinds = part[1]
            found.update((base + 7 - at, WRITTEN) for at, char in enumerate(kinds) if char != "?")
            found.update((address, WRITTEN) for address in range(base, base + 8 - len(kinds)))
        else:
            spilled = kind(slot)
            what = WRITTEN if spilled == "scalar" else spilled
            found.update((address, what) for address in range(base, base + 8))
    return found


def worst(before: dict[int, str] | None, now: dict[int, str]) -> dict[int, str]:
    """Per byte, the worst of two calls' stacks: written only if written in both, a pointer's type
    only if the same in both; anything else MIXED (refused however it is read)."""
    if before is None:
        return now
    worst = {}
    for address in before.keys() | now.keys():
        old, new = before.get(address, ""), now.get(address, "")
        if old == new:
            worst[address] = old
        elif {old, new} != {"", WRITTEN}:  # written on one, unwritten on the other: absent
            worst[address] = MIXED
    return worst


def written_bytes(stack: dict[int, str]) -> set[int]:
    return {address for address, what in stack_bytes(stack).items() if what == WRITTEN}


def misc_bytes(stack: dict[int, str]) -> set[int]:
    """Bytes of unknown scalar written byte-wise (STACK_MISC, printed `m`)."""
    found: set[int] = set()
    for base, slot in stack.items():
        kinds = slot if _BYTE_KINDS.match(slot) else (part[1] if (part := _PART_SPILLED.match(slot)) else "")
        found.update(base + 7 - at for at, char in enumerate(kinds) if char == "m")
    return found
