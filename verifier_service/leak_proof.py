"""The proof behind proven mode: from the kernel verifier's own level-2 log of a load with the
privileges the idioms need (CAP_PERFMON: `data_end - data`, packet pointer plus a bounded
register, bounded loops), that no pointer value and no unwritten stack byte reaches anything the
program can expose: a map value or key, a global, the packet, the return value, a helper's
number argument, or a branch that compares it with a number. Pure: the log and the instructions
in, reasons out (empty: proven).

What a privileged load would let through and these rules refuse (docs/architecture.md §5):
a pointer stored anywhere but the program's own stack; arithmetic that makes a number of a
pointer (anything but pointer +/- number, and packet pointer - packet pointer, a length); a
pointer compared with anything but 0 or another packet pointer; a pointer returned, or passed
where a helper takes a number; stack bytes the program never wrote, or a spilled pointer, read
or handed to a helper. Whatever the rules cannot follow fails closed."""

import re

from schemas.ebpf import Reason
from verifier_service.bytecode import (
    ALU,
    ALU64,
    ATOMIC,
    CALL,
    CALL_HELPER,
    EXIT,
    JMP,
    JMP32,
    LDX,
    MEM,
    ST,
    STX,
    Insn,
)
from verifier_service.helper_ids import HELPER_NAMES
from verifier_service.stack_state import MIXED, WRITTEN, Frame, kind, stack_bytes
from verifier_service.verifier_log import LogError, Pruned, Step, Unfollowed, steps

# What each reviewed helper takes, argument by argument (C prototypes: bpf_helper_defs.h).
#   typed: a pointer the kernel checks the type of (the context, a map, a spin lock, a string)
#   n: a number           write: memory the helper writes
#   read: memory the helper reads, its size in the next argument
#   key, value: memory read, the size of the map's (argument 1) key or value
HELPER_ARGS: dict[int, tuple[str, ...]] = {
    1: ("typed", "key"),  # map_lookup_elem
    2: ("typed", "key", "value", "n"),  # map_update_elem
    3: ("typed", "key"),  # map_delete_elem
    5: (), 7: (), 8: (), 118: (), 125: (), 160: (),  # clocks, prandom, cpu id
    9: ("typed", "n", "read", "n", "n"),  # skb_store_bytes
    10: ("typed", "n", "n", "n", "n"), 11: ("typed", "n", "n", "n", "n"),  # l3/l4 csum_replace
    18: ("typed", "n", "n"), 19: ("typed",),  # skb_vlan_push/pop
    26: ("typed", "n", "write", "n"),  # skb_load_bytes
    28: ("read", "n", "read", "n", "n"),  # csum_diff
    31: ("typed", "n", "n"), 34: ("typed",), 38: ("typed", "n", "n"), 39: ("typed", "n"),
    40: ("typed", "n"), 41: ("typed",), 43: ("typed", "n", "n"), 44: ("typed", "n"),
    48: ("typed", "n"), 50: ("typed", "n", "n", "n"), 54: ("typed", "n"), 65: ("typed", "n"),
    68: ("typed", "n", "write", "n", "n"),  # skb_load_bytes_relative
    87: ("typed", "value", "n"),  # map_push_elem
    88: ("typed", "write"), 89: ("typed", "write"),  # map_pop/peek_elem
    93: ("typed",), 94: ("typed",),  # spin_lock/unlock
    97: ("typed",), 135: ("typed", "n"),
    164: ("typed", "typed", "typed", "n"),  # for_each_map_elem
    181: ("n", "typed", "typed", "n"),  # loop
    182: ("read", "n", "typed"),  # strncmp: s2 must be a read-only global string
    188: ("typed",),  # xdp_get_buff_len
    189: ("typed", "n", "write", "n"),  # xdp_load_bytes
    190: ("typed", "n", "read", "n"),  # xdp_store_bytes
}  # fmt: skip

PACKET = {"pkt", "pkt_meta", "pkt_end"}  # pointers into (or just past) the program's own packet
_CONST = re.compile(r"^P?(-?\d+|0x[0-9a-f]+)$")
_UMAX = re.compile(r"(?:^|[(,])umax=(\d+|0x[0-9a-f]+)")
_STACK = re.compile(r"^fp(?:\[(\d+)\])?(-?\d+)$")  # fp-8 (this frame's), fp[0]-8 (frame 0's)
_MAP_SIZES = re.compile(r"ks=(\d+),vs=(\d+)")
_OPS = {0x00: "+", 0x10: "-", 0x20: "*", 0x30: "/", 0x40: "|", 0x50: "&", 0x60: "<<", 0x70: ">>",
        0x80: "neg", 0x90: "%", 0xA0: "^", 0xB0: "=", 0xC0: "s>>", 0xD0: "byte swap"}  # fmt: skip
_MEMORY = {"map_value": "a map value or a global", "pkt": "the packet", "ctx": "the context"}
MAX_EXACT_WINDOW = 512  # the stack's size: a read of unknown length is checked to the frame's top


class _Leak(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def prove(log: str, insns: list[Insn]) -> list[Reason]:
    """Every way the program can expose a pointer or unwritten stack: at most one reason per
    instruction, in the order of the instructions."""
    found: dict[int, Reason] = {}
    try:
        for step in steps(log, insns):
            if step.insn in found:
                continue
            if isinstance(step, Pruned):
                found[step.insn] = Reason("unproven", _pruned(step), step.insn)
            elif isinstance(step, Unfollowed):
                found[step.insn] = Reason("unproven", _UNFOLLOWED, step.insn)
            else:
                try:
                    _check(insns[step.insn], step)
                except _Leak as leak:
                    found[step.insn] = Reason(leak.code, str(leak), step.insn)
    except LogError as exc:
        return [Reason("unproven", f"proven mode could not check it: {exc}")]
    return [found[index] for index in sorted(found)]


_UNFOLLOWED = (
    "the kernel cut a path short inside a subprogram or callback, judging it like one it had "
    "walked, which proven mode cannot check (the log prints one frame's stack): make it "
    "__always_inline, or verify in strict mode"
)


def _pruned(pruned: Pruned) -> str:
    low, high = min(pruned.covered), max(pruned.covered)
    return (
        f"paths meet here with stack bytes fp{low}..fp{high} written on one and unwritten or holding "
        "a pointer on another; the kernel checked only the first, so what it holds on the second "
        "is unproven: initialize the variable on every path (= {} or __builtin_memset)"
    )


def _check(insn: Insn, step: Step) -> None:
    cls, state = insn.cls, step.state
    if cls in (ALU, ALU64):
        _alu(insn, cls, state)
    elif cls in (STX, ST):
        _store(insn, step)
    elif cls == LDX and insn.code & 0xE0 in (MEM, 0x80):  # MEM and MEMSX loads
        _load(insn, step)
    elif cls in (JMP, JMP32):
        op = insn.code & 0xF0
        if insn.code == EXIT:
            if step.frame == 0 and _pointer(state, 0):
                raise _Leak("pointer_leak", f"returns a pointer ({_type(state, 0)}): return a number")
        elif insn.code == CALL:
            _call(insn, step)
        elif op != 0x00:  # ja and gotol jump unconditionally
            _compare(insn, cls, state)


def _pointer(state: Frame, reg: int) -> bool:
    """True for a pointer, and for what the log did not show (fail closed)."""
    return kind(state.regs.get(reg)) != "scalar"


def _type(state: Frame, reg: int) -> str:
    return kind(state.regs.get(reg))


def _alu(insn: Insn, cls: int, state: Frame) -> None:
    op, from_reg = insn.code & 0xF0, bool(insn.code & 0x08)
    dst, src = _pointer(state, insn.dst), from_reg and _pointer(state, insn.src)
    if op == 0xB0 and not from_reg:
        return  # r = constant
    if op == 0xB0:
        dst = False  # a move only reads its source
    if not dst and not src:
        return
    pointer = _type(state, insn.dst) if dst else _type(state, insn.src)
    if cls == ALU and op == 0xB0:
        raise _Leak("pointer_leak", f"a 32-bit move of a pointer ({pointer}) keeps its low bits, a number")
    if cls == ALU:
        what = _OPS.get(op, "arithmetic")
        raise _Leak("pointer_leak", f"32-bit {what} on a pointer ({pointer}) makes a number of it")
    if op == 0xB0:
        if insn.off:  # movsx
            raise _Leak("pointer_leak", f"a sign-extending move of a pointer ({pointer}) is a number")
        return
    if op == 0x00 and not (dst and src):
        return  # pointer + number, number + pointer: a pointer the kernel tracks
    if op == 0x10 and dst and not src:
        return  # pointer - number
    if op == 0x10 and dst and src:
        left, right = _type(state, insn.dst), _type(state, insn.src)
        if left in PACKET and right in PACKET:
            return  # a length within the program's own packet, as in `data_end - data`
        raise _Leak(
            "pointer_leak",
            f"subtracts two pointers ({left} - {right}): only packet pointers may be subtracted (a length)",
        )
    raise _Leak("pointer_leak", f"{_OPS.get(op, 'arithmetic')} on a pointer ({pointer}) makes a number of it")


def _store(insn: Insn, step: Step) -> None:
    mode, state = insn.code & 0xE0, step.state
    target = state.regs.get(insn.dst)
    if mode == ATOMIC:
        if _pointer(state, insn.src):
            raise _Leak("pointer_leak", f"an atomic operation stores a pointer ({_type(state, insn.src)})")
        if kind(target) == "fp":
            raise _Leak("pointer_leak", "an atomic operation on the stack (where pointers are spilled)")
        return
    if mode != MEM:
        return
    stores_pointer = insn.cls == STX and _pointer(state, insn.src)  # ST stores its immediate
    if kind(target) == "fp":
        start = _stack(step, target)[0] + insn.off
        _keeps_pointers_whole(step, target, start, start + _size(insn), "stores into")
    if kind(target) == "fp" and _stack(step, target)[1] is not None and stores_pointer:
        raise _Leak("pointer_leak", f"stores a pointer ({_type(state, insn.src)}) into its caller's stack")
    if stores_pointer and kind(target) != "fp":
        raise _Leak(
            "pointer_leak",
            f"stores a pointer ({_type(state, insn.src)}) into {_MEMORY.get(kind(target), kind(target))}: "
            "store numbers; only the program's own stack may hold pointers",
        )


def _load(insn: Insn, step: Step) -> None:
    source = step.state.regs.get(insn.src)
    if kind(source) != "fp":
        return  # maps, globals, the packet and the context hold no pointer of ours (stores say so)
    start = _stack(step, source)[0]
    _initialized(step, source, start + insn.off, start + insn.off + _size(insn), "reads", fills=True)


def _compare(insn: Insn, cls: int, state: Frame) -> None:
    from_reg = bool(insn.code & 0x08)
    left = _pointer(state, insn.dst)
    right = from_reg and _pointer(state, insn.src)
    if not left and not right:
        return
    if cls == JMP32:
        raise _Leak("pointer_leak", "a 32-bit comparison of a pointer reveals its bits")
    if left and right and _type(state, insn.dst) in PACKET and _type(state, insn.src) in PACKET:
        return  # a bounds check against the packet's end
    other = state.regs.get(insn.src if left else insn.dst, "") if from_reg or not left else str(insn.imm)
    if left != right and _const_value(other) == 0:
        return  # a null check
    pointers = " and ".join(_type(state, r) for r, p in ((insn.dst, left), (insn.src, right)) if p)
    raise _Leak(
        "pointer_leak",
        f"compares a pointer ({pointers}) with a number or another kind of pointer: its address "
        "would steer the program; compare packet pointers with each other, others only with 0",
    )


def _call(insn: Insn, step: Step) -> None:
    if insn.src != CALL_HELPER:
        return  # a subprogram: walked on, its reads of its caller's stack checked (Step.callers)
    state = step.state
    name = HELPER_NAMES.get(insn.imm, f"helper #{insn.imm}")
    args = HELPER_ARGS.get(insn.imm)
    if args is None:
        raise _Leak("unproven", f"{name}: its arguments are not reviewed for proven mode")
    for reg, arg in enumerate(args, start=1):
        value = state.regs.get(reg)
        if arg == "n" and _pointer(state, reg):
            raise _Leak(
                "pointer_leak", f"passes a pointer ({kind(value)}) as argument {reg} of {name}, a number"
            )
        if arg in ("read", "key", "value") and kind(value) == "fp":
            start = _stack(step, value)[0]
            _initialized(step, value, start, start + _window(state, reg, arg), f"gives {name}")
        if arg == "write" and kind(value) == "fp":
            start = _stack(step, value)[0]
            _keeps_pointers_whole(
                step, value, start, start + _window(state, reg, "read"), f"has {name} write"
            )


def _keeps_pointers_whole(step: Step, pointer: str | None, start: int, end: int, what: str) -> None:
    """A write of [start, end) into the stack overwrites any spilled pointer whole or not at all:
    with CAP_PERFMON the kernel lets part of one be overwritten and takes the rest for a number
    (STACK_MISC), which a load would then read out (measured: accepted, 7 bytes of the context's
    address into a map)."""
    caller = _stack(step, pointer)[1]
    found = stack_bytes(step.state.stack) if caller is None else step.callers.get(caller, {})
    for base in range(start - start % 8, end, 8):  # each slot the write touches
        slot = [found.get(address, "") for address in range(base, base + 8)]
        if any(byte not in ("", WRITTEN) for byte in slot) and not (start <= base and base + 8 <= end):
            raise _Leak(
                "pointer_leak",
                f"{what} part of a pointer spilled at fp{base}, leaving the rest of its address to be read "
                "as a number: overwrite the whole 8 bytes",
            )


def _window(state: Frame, reg: int, arg: str) -> int:
    """How many bytes a helper reads from argument `reg`; unknown: to the frame's top."""
    if arg in ("key", "value"):
        sizes = _MAP_SIZES.search(state.regs.get(1, ""))
        if sizes:
            return int(sizes[1] if arg == "key" else sizes[2])
        return MAX_EXACT_WINDOW
    size = state.regs.get(reg + 1, "")
    if (value := _const_value(size)) is not None:
        return value
    if (umax := _UMAX.search(size)) and int(umax[1], 0) <= MAX_EXACT_WINDOW:
        return int(umax[1], 0)
    return MAX_EXACT_WINDOW


def _initialized(
    step: Step, pointer: str | None, start: int, end: int, what: str, fills: bool = False
) -> None:
    """Every byte of [start, end) below the frame pointer of the frame `pointer` points into was
    written, and none is a spilled pointer (unless `fills`: a load of a whole spilled register
    gets the pointer back, typed). A caller's stack is the worst of every call it made."""
    _offset, caller = _stack(step, pointer)
    found = stack_bytes(step.state.stack) if caller is None else step.callers.get(caller, {})
    where = "its" if caller is None else "its caller's"
    end = min(end, 0)
    for address in range(start, end):
        byte = found.get(address)
        if byte is None:
            raise _Leak(
                "uninitialized_stack",
                f"{what} {where} stack bytes fp{start}..fp{end - 1}, of which fp{address} was never "
                "written: initialize it (= {} or __builtin_memset)",
            )
        if byte == MIXED:
            raise _Leak(
                "uninitialized_stack",
                f"{what} {where} stack at fp{address}, which the calls that reach here left differently "
                "(written on one, unwritten or a pointer on another)",
            )
        if byte != WRITTEN and not fills:
            raise _Leak("pointer_leak", f"{what} a pointer ({byte}) spilled to {where} stack at fp{address}")


def _stack(step: Step, pointer: str | None) -> tuple[int, int | None]:
    """(the offset a fixed stack pointer holds, the caller's frame it points into or None)."""
    match = _STACK.match(pointer or "")
    if match is None:
        raise _Leak("stack", f"uses the stack at a variable offset ({pointer}): index it by a constant")
    frame = int(match[1]) if match[1] is not None else step.frame
    return int(match[2]), None if frame == step.frame else frame


def _const_value(value: str) -> int | None:
    match = _CONST.match(value)
    return int(match[1], 0) if match else None


def _size(insn: Insn) -> int:
    return {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}[insn.code & 0x18]
