"""When each function log reached which size, noted at every size check (function_logs.CHECK_S):
what `hetfaas logs --since` starts from, and the generation (rotations) that `logs -f` positions
carry, since a rotation empties the log in place and its offsets start again at 0, and where
the last rotation's copy starts, so that a follower one generation behind reads the copy on.

Bounded: KEEP marks per log (an hour at one mark per 2 s check), for the logs on disk."""

import bisect
from collections import deque
from pathlib import Path

KEEP = 1800


class LogClock:
    def __init__(self, keep: int = KEEP):
        self._keep = keep
        self._marks: dict[Path, deque[tuple[float, int]]] = {}  # (time, size), oldest first
        self._generation: dict[Path, int] = {}
        self._copied_from: dict[Path, int] = {}  # the last rotation's: its copy's first offset

    def observe(self, path: Path, size: int, now: float) -> None:
        marks = self._marks.get(path)
        if marks is None:
            marks = self._marks[path] = deque(maxlen=self._keep)
        if not marks or marks[-1][1] != size:
            marks.append((now, size))

    def rotated(self, path: Path, copied_from: int) -> None:
        self._generation[path] = self.generation(path) + 1
        self._copied_from[path] = copied_from
        self._marks.pop(path, None)

    def forget_except(self, present: set[Path]) -> None:
        """Logs gone from disk (their function's directory removed) are forgotten."""
        for path in [p for p in self._marks if p not in present]:
            del self._marks[path]
        for path in [p for p in self._generation if p not in present]:
            del self._generation[path]
            self._copied_from.pop(path, None)

    def generation(self, path: Path) -> int:
        return self._generation.get(path, 0)

    def in_copy(self, path: Path, generation: int, offset: int) -> int | None:
        """Where an offset of `generation` lies in the rotated copy, when that generation is the
        one just before the log's now; None otherwise (older: that copy is gone)."""
        if generation != self.generation(path) - 1 or path not in self._copied_from:
            return None
        return offset - self._copied_from[path]

    def offset_at(self, path: Path, when: float) -> int:
        """Where the log ended at `when` (to the check's resolution): what was written after
        starts there. 0 when nothing is known from that far back."""
        marks = self._marks.get(path)
        if not marks:
            return 0
        index = bisect.bisect_right([t for t, _ in marks], when) - 1
        return marks[index][1] if index >= 0 else 0
