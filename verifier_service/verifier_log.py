"""Reading the kernel verifier's level-2 log (BPF_LOG_LEVEL2): for every instruction it walked,
on every path, the type of each register and stack slot just before the instruction ran. Pure:
the log's text and the program's instructions in, steps out.

The log (6.x) is a walk: `from X to Y: <state>` starts a path with the whole state of the
current frame; `N: (op) text ; <state>` is instruction N followed by what it changed;
`N: <state>` is a change printed apart (when other lines came between). A state is
`[frameK: ]R1=ctx() R6=pkt(r=14) R10=fp0 fp-8=ctx() fp-16=mmmm????`; a register or slot missing
from a whole state is unwritten. Lines about precision (`mark_precise`), liveness and calls'
`caller:`/`callee:` summaries repeat what these lines say, and are skipped."""

import re
from collections.abc import Iterator
from typing import NamedTuple

from verifier_service.bytecode import CALL, CALL_HELPER, Insn

_FROM = re.compile(r"^from (\d+) to (\d+)(?: \(speculative execution\))?: (.*)$")
_PRUNED = re.compile(r"^(\d+): safe$")
_INSN = re.compile(r"^(\d+): \([0-9a-f]{2}\) [^;]*?(?:\s+; (.*))?$")
_STATE = re.compile(r"^\d+: ((?:frame\d+: )?(?:R\d|fp).*)$")
_NAME = re.compile(r"^(?:R(\d+)|fp(-\d+))(?:_\w+)?=(.*)$", re.S)
_FRAME = re.compile(r"^frame(\d+):$")
DONE = re.compile(r"^processed \d+ insns", re.MULTILINE)


class Frame:
    """One frame's registers (number -> the kernel's text for it) and stack slots (offset of the
    slot's lowest byte, a negative multiple of 8 -> a spilled register's text or 8 byte kinds)."""

    __slots__ = ("regs", "stack")

    def __init__(self) -> None:
        self.regs: dict[int, str] = {}
        self.stack: dict[int, str] = {}


class Step(NamedTuple):
    insn: int  # the instruction's index
    frame: int  # 0: the program; 1.. the subprograms and callbacks it called
    state: Frame  # before the instruction ran; valid until the next step is taken
    # frame -> its stack's bytes (stack_bytes) as the worst of every call made from it: what a
    # callee may find through a pointer into its caller's stack (`fp[0]-8`)
    callers: dict[int, dict[int, str]]


_SCALAR = re.compile(r"^P?(?:-?\d+|0x[0-9a-f]+|scalar(?:\(.*\))?)$", re.S)
_BYTE_KINDS = re.compile(r"^[?rm0dif]{8}$")  # invalid, spill, misc, zero, dynptr, iter, irq flag
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
        else:
            spilled = kind(slot)
            what = WRITTEN if spilled == "scalar" else spilled
            found.update((address, what) for address in range(base, base + 8))
    return found


def _worst(before: dict[int, str] | None, now: dict[int, str]) -> dict[int, str]:
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


class LogError(ValueError):
    """The log is not one this reader can follow (the proof then fails closed)."""


class Pruned(NamedTuple):
    """The kernel stopped walking a path at `insn`, judging it covered by a state it had walked
    there before. With CAP_PERFMON a walked stack byte of unknown scalar (STACK_MISC) covers any
    byte, unwritten or a spilled pointer (stacksafe(): `allow_uninit_stack`): `covered` are the
    bytes where that may have hidden a hazard the walked path never had."""

    insn: int
    covered: set[int]  # stack bytes (frame 0) unwritten or a spilled pointer here, MISC before


class Unfollowed(NamedTuple):
    """A path pruned inside a subprogram or callback: its frames' stacks are not all printed."""

    insn: int


def split_state(text: str) -> tuple[int | None, dict[int, str], dict[int, str]]:
    """`[frameK: ]NAME=VALUE ...` -> (K or None, registers, stack slots); spaces inside a value's
    parentheses, as in `var_off=(0x0; 0x3c)`, belong to the value."""
    tokens, depth, start = [], 0, 0
    for at, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == " " and depth == 0:
            tokens.append(text[start:at])
            start = at + 1
    tokens.append(text[start:])
    frame, regs, stack = None, {}, {}
    for token in filter(None, tokens):
        if match := _FRAME.match(token):
            frame = int(match[1])
        elif match := _NAME.match(token):
            if match[1] is not None:
                regs[int(match[1])] = match[3]
            else:
                stack[int(match[2])] = match[3]
    return frame, regs, stack


def _hazards(found: dict[int, str]) -> set[int]:
    """Bytes below the frame pointer that are unwritten or hold a spilled pointer."""
    return {a for a in range(-512, 0) if found.get(a, "") != WRITTEN}


def _misc(stack: dict[int, str]) -> set[int]:
    """Bytes of unknown scalar written byte-wise (STACK_MISC, printed `m`)."""
    return {
        base + 7 - at
        for base, slot in stack.items()
        if _BYTE_KINDS.match(slot)
        for at, char in enumerate(slot)
        if char == "m"
    }


def steps(log: str, insns: list[Insn]) -> Iterator[Step | Pruned | Unfollowed]:
    """Every instruction the log shows the kernel walking, with the state before it; and every
    path it pruned (Pruned, Unfollowed)."""
    if not DONE.search(log):
        raise LogError("the kernel's log is incomplete (it did not reach its last line)")
    frames: list[Frame] = [Frame()]
    callers: dict[int, dict[int, str]] = {}
    current = 0
    # frame 0's instructions: the stack bytes MISC at any visit, and hazardous at any visit
    misc_at: dict[int, set[int]] = {}
    hazards_at: dict[int, set[int]] = {}
    frame_of: dict[int, int] = {}

    def apply(text: str, whole: bool) -> None:
        nonlocal current
        frame, regs, stack = split_state(text)
        current = frame if frame is not None else 0
        while len(frames) <= current:
            frames.append(Frame())
        target = frames[current]
        if whole:
            target.regs, target.stack = regs, stack
        else:
            target.regs.update(regs)
            target.stack.update(stack)

    for line in log.splitlines():
        if match := _FROM.match(line):
            if match[3] != "safe":
                apply(match[3], whole=True)
                continue
            # the state popped was pushed at a visit of the branch: any of them
            branch, target = int(match[1]), int(match[2])
            if frame_of.get(branch) != 0 or frame_of.get(target) != 0:  # a callee's, or not walked
                yield Unfollowed(target)
            elif covered := hazards_at.get(branch, set()) & misc_at.get(target, set()):
                yield Pruned(target, covered)
        elif match := _PRUNED.match(line):
            target = int(match[1])
            if current != 0 or frame_of.get(target) != 0:
                yield Unfollowed(target)
            elif covered := _hazards(stack_bytes(frames[0].stack)) & misc_at.get(target, set()):
                yield Pruned(target, covered)
        elif match := _INSN.match(line):
            index = int(match[1])
            if not 0 <= index < len(insns):
                raise LogError(f"the log names instruction {index}, past the program's end")
            frame_of[index] = current
            if current == 0:
                stack = frames[0].stack
                misc_at.setdefault(index, set()).update(_misc(stack))
                hazards_at.setdefault(index, set()).update(_hazards(stack_bytes(stack)))
            yield Step(index, current, frames[current], callers)
            insn = insns[index]
            if insn.code == CALL:
                # a callee (a subprogram, or a helper's callback) starts a frame of its own,
                # printed next; a helper leaves R1-R5 unwritten
                del frames[current + 1 :]
                frames.append(Frame())
                callers[current] = _worst(callers.get(current), stack_bytes(frames[current].stack))
                if insn.src == CALL_HELPER:
                    for reg in range(1, 6):
                        frames[current].regs.pop(reg, None)
            if match[2]:
                apply(match[2], whole=False)
        elif match := _STATE.match(line):
            apply(match[1], whole=False)
