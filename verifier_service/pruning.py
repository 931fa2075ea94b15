"""Where the kernel pruned a path that proven mode cannot take for proven (verifier_log.py reads
the log, this keeps what pruning needs). Pure state, fed by the log's walk.

The kernel stops walking a path at an instruction where an earlier walked state covers it, and
with CAP_PERFMON a stack byte of unknown scalar (STACK_MISC) in the walked state covers anything
in the new one: an unwritten byte, or part of a spilled pointer (stacksafe(), under
allow_uninit_stack). What the new path would read there was never checked. So for every frame
of the pruned state, the bytes MISC at some walked visit of that instruction must be written
(with a number) in the pruned state.

The log prints only the current frame, so a callee's callers are kept as what is true of every
call from them: written only if written at every call, MISC if MISC at any call or written by a
callee through a pointer into them (a store's bytes; a helper's, to the frame's top)."""

from verifier_service.stack_state import Frame, misc_bytes, written_bytes

_Sets = list[set[int]]  # per frame of the state (0: the program), some of its stack bytes


class PruneWatch:
    def __init__(self) -> None:
        self._misc_at: dict[tuple[int, int], _Sets] = {}  # (instruction, depth) -> MISC, any visit
        self._written_at: dict[tuple[int, int], _Sets] = {}  # ... -> written at every visit
        self._caller_written: dict[int, set[int]] = {}  # frame -> written at every call from it
        self._caller_misc: dict[int, set[int]] = {}  # frame -> MISC at some call, or by a callee

    def call(self, depth: int, frame: Frame) -> None:
        """A call from the frame at `depth` (a subprogram, or a helper's callback)."""
        written = written_bytes(frame.stack)
        known = self._caller_written.get(depth)
        self._caller_written[depth] = written if known is None else known & written
        self._caller_misc.setdefault(depth, set()).update(misc_bytes(frame.stack))

    def callee_wrote(self, caller: int, start: int, end: int) -> None:
        """A callee wrote [start, end) of its caller's frame through a pointer into it."""
        self._caller_misc.setdefault(caller, set()).update(range(start, min(end, 0)))

    def visit(self, insn: int, depth: int, frame: Frame) -> None:
        """The walked state before `insn`, at call depth `depth`, its own frame `frame`."""
        misc = [self._caller_misc.get(j, set()) for j in range(depth)] + [misc_bytes(frame.stack)]
        written = [self._caller_written.get(j, set()) for j in range(depth)] + [written_bytes(frame.stack)]
        key = (insn, depth)
        if key not in self._misc_at:
            self._misc_at[key], self._written_at[key] = [set(s) for s in misc], written
            return
        for j in range(depth + 1):
            self._misc_at[key][j] |= misc[j]
            self._written_at[key][j] &= written[j]

    def popped(self, branch: int, target: int) -> set[int] | None:
        """A state pushed at a visit of `branch` was found covered at `target`: the bytes that
        may have hidden a hazard (empty: none), or None when neither was walked as expected."""
        pushed = [d for (at, d) in self._written_at if at == branch]
        walked = [d for (at, d) in self._misc_at if at == target]
        if not pushed or not walked:
            return None
        covered: set[int] = set()
        for d_branch in pushed:
            for d_target in walked:
                written, misc = self._written_at[(branch, d_branch)], self._misc_at[(target, d_target)]
                for j in range(min(d_branch, d_target) + 1):
                    covered |= misc[j] - written[j]
        return covered

    def pruned_here(self, target: int, depth: int, frame: Frame) -> set[int] | None:
        """The current path (its own frame `frame`) was found covered at `target`."""
        misc = self._misc_at.get((target, depth))
        if misc is None:
            return None
        written = [self._caller_written.get(j, set()) for j in range(depth)] + [written_bytes(frame.stack)]
        return set().union(*(misc[j] - written[j] for j in range(depth + 1)))
