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

from verifier_service.bytecode import CALL, CALL_HELPER, MEM, ST, STX, Insn
from verifier_service.pruning import PruneWatch
from verifier_service.stack_state import Frame, stack_bytes, worst

_FROM = re.compile(r"^from (\d+) to (\d+)(?: \(speculative execution\))?: (.*)$")
_PRUNED = re.compile(r"^(\d+): safe$")
_INSN = re.compile(r"^(\d+): \([0-9a-f]{2}\) [^;]*?(?:\s+; (.*))?$")
_STATE = re.compile(r"^\d+: ((?:frame\d+: )?(?:R\d|fp).*)$")
_NAME = re.compile(r"^(?:R(\d+)|fp(-\d+))(?:_\w+)?=(.*)$", re.S)
_FRAME = re.compile(r"^frame(\d+):$")
DONE = re.compile(r"^processed \d+ insns", re.MULTILINE)


class Step(NamedTuple):
    insn: int  # the instruction's index
    frame: int  # 0: the program; 1.. the subprograms and callbacks it called
    state: Frame  # before the instruction ran; valid until the next step is taken
    # frame -> its stack's bytes (stack_bytes) as the worst of every call made from it: what a
    # callee may find through a pointer into its caller's stack (`fp[0]-8`)
    callers: dict[int, dict[int, str]]


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


def steps(log: str, insns: list[Insn]) -> Iterator[Step | Pruned | Unfollowed]:
    """Every instruction the log shows the kernel walking, with the state before it; and every
    path it pruned (Pruned, Unfollowed)."""
    if not DONE.search(log):
        raise LogError("the kernel's log is incomplete (it did not reach its last line)")
    frames: list[Frame] = [Frame()]
    callers: dict[int, dict[int, str]] = {}
    current = 0
    watch = PruneWatch()

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
            yield from _pruned(int(match[2]), watch.popped(int(match[1]), int(match[2])))
        elif match := _PRUNED.match(line):
            yield from _pruned(int(match[1]), watch.pruned_here(int(match[1]), current, frames[current]))
        elif match := _INSN.match(line):
            index = int(match[1])
            if not 0 <= index < len(insns):
                raise LogError(f"the log names instruction {index}, past the program's end")
            watch.visit(index, current, frames[current])
            yield Step(index, current, frames[current], callers)
            insn = insns[index]
            _note_callee_writes(watch, insn, frames[current])
            if insn.code == CALL:
                watch.call(current, frames[current])
                # a callee (a subprogram, or a helper's callback) starts a frame of its own,
                # printed next; a helper leaves R1-R5 unwritten
                del frames[current + 1 :]
                frames.append(Frame())
                callers[current] = worst(callers.get(current), stack_bytes(frames[current].stack))
                if insn.src == CALL_HELPER:
                    for reg in range(1, 6):
                        frames[current].regs.pop(reg, None)
            if match[2]:
                apply(match[2], whole=False)
        elif match := _STATE.match(line):
            apply(match[1], whole=False)


def _pruned(target: int, covered: set[int] | None) -> Iterator[Pruned | Unfollowed]:
    if covered is None:
        yield Unfollowed(target)
    elif covered:
        yield Pruned(target, covered)


_CALLER_STACK = re.compile(r"^fp\[(\d+)\](-\d+)$")


def _note_callee_writes(watch: PruneWatch, insn: Insn, frame: Frame) -> None:
    """A store through a pointer into a caller's stack, or a helper handed one (it may write
    from there to the frame's top): those bytes may now be MISC in that caller."""
    targets = []
    if insn.cls in (STX, ST) and insn.code & 0xE0 == MEM:
        targets = [
            (frame.regs.get(insn.dst, ""), insn.off, {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}[insn.code & 0x18])
        ]
    elif insn.code == CALL and insn.src == CALL_HELPER:
        targets = [(frame.regs.get(reg, ""), 0, 512) for reg in range(1, 6)]
    for pointer, offset, size in targets:
        if match := _CALLER_STACK.match(pointer):
            start = int(match[2]) + offset
            watch.callee_wrote(int(match[1]), start, start + size)
