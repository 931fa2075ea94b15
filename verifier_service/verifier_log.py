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

from verifier_service.bytecode import CALL, CALL_HELPER, CALL_SUBPROGRAM, Insn

_FROM = re.compile(r"^from \d+ to \d+(?: \(speculative execution\))?: (.*)$")
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
    frame: int  # 0: the program; 1.. the subprograms it called
    state: Frame  # before the instruction ran; valid until the next step is taken


class LogError(ValueError):
    """The log is not one this reader can follow (the proof then fails closed)."""


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


def steps(log: str, insns: list[Insn]) -> Iterator[Step]:
    """Every instruction the log shows the kernel walking, with the state before it."""
    if not DONE.search(log):
        raise LogError("the kernel's log is incomplete (it did not reach its last line)")
    frames: list[Frame] = [Frame()]
    current = 0

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
            if match[1] != "safe":  # a pruned path: nothing follows on it
                apply(match[1], whole=True)
        elif match := _INSN.match(line):
            index = int(match[1])
            if not 0 <= index < len(insns):
                raise LogError(f"the log names instruction {index}, past the program's end")
            yield Step(index, current, frames[current])
            insn = insns[index]
            if insn.code == CALL and insn.src == CALL_HELPER:
                for reg in range(1, 6):  # a helper leaves R1-R5 unwritten
                    frames[current].regs.pop(reg, None)
            elif insn.code == CALL and insn.src == CALL_SUBPROGRAM:
                del frames[current + 1 :]  # the callee starts a frame of its own, printed next
                frames.append(Frame())
            if match[2]:
                apply(match[2], whole=False)
        elif match := _STATE.match(line):
            apply(match[1], whole=False)
