"""cgroup layout detection and the operations on one pool slot.

A slot is one cgroup per hierarchy with the same opaque name: on pure cgroup v2 a single directory;
on hybrid hosts (v1 controllers + a controller-less cgroup2 mount) a v2 directory, which takes the
process through clone3(CLONE_INTO_CGROUP) and gives `cgroup.kill` and `cgroup.events`, plus one
v1 directory per controller, where the limits live. Everything we create sits under one subtree
per node, `hetfaas.<node_id>`, and nothing outside it is ever written."""

import os
import signal
import time
from pathlib import Path
from typing import NamedTuple

import msgspec

CONTROLLERS = ("memory", "cpu", "pids")
SUBTREE_PREFIX = "hetfaas."
CPU_PERIOD_US = 100_000


class CgroupError(RuntimeError):
    """The host's cgroups cannot hold sandboxes (a missing controller, a read-only mount)."""


class Layout(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # "v2" (controllers in cgroup2), "hybrid" (controllers in v1, a cgroup2 mount too) or "v1"
    v2_root: str | None  # our subtree in the cgroup2 hierarchy
    v1_roots: dict[str, str]  # controller -> our subtree in its v1 hierarchy

    def slot(self, name: str) -> "Slot":
        return Slot(name, self)


class Limits(msgspec.Struct, frozen=True):
    memory_mb: int
    cpu_millis: int  # 1000 = one CPU
    pids_max: int


def parse_mountinfo(text: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of every cgroup mount in /proc/self/mountinfo text."""
    mounts = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            mounts.append((fields[4].replace("\\040", " "), tail[0], set(tail[2].split(","))))
    return mounts


def plan_layout(
    mounts: list[tuple[str, str, set[str]]], v2_controllers: set[str], parent: str, node_id: str
) -> Layout:
    """Where our subtree goes, from the cgroup mounts and the controllers cgroup2 offers. Pure."""
    subtree = SUBTREE_PREFIX + node_id
    v2 = next((point for point, fstype, _ in mounts if fstype == "cgroup2"), None)
    v2_root = os.path.join(v2, parent.strip("/"), subtree) if v2 else None
    if v2 and set(CONTROLLERS) <= v2_controllers:
        return Layout(kind="v2", v2_root=v2_root, v1_roots={})
    v1 = {}
    for controller in CONTROLLERS:
        point = next((p for p, fstype, opts in mounts if fstype == "cgroup" and controller in opts), None)
        if point is None:
            raise CgroupError(f"no cgroup hierarchy offers the {controller} controller")
        v1[controller] = os.path.join(point, parent.strip("/"), subtree)
    return Layout(kind="hybrid" if v2 else "v1", v2_root=v2_root, v1_roots=v1)


def detect_layout(parent: str, node_id: str) -> Layout:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    v2 = next((point for point, fstype, _ in mounts if fstype == "cgroup2"), None)
    controllers = set(Path(v2, "cgroup.controllers").read_text().split()) if v2 else set()
    return plan_layout(mounts, controllers, parent, node_id)


def prepare_subtree(layout: Layout) -> None:
    """Create our subtree (idempotent); on pure v2, delegate the controllers down to its slots."""
    for root in _roots(layout):
        os.makedirs(root, exist_ok=True)
    if layout.kind != "v2":
        return
    assert layout.v2_root
    # Enable the controllers on each of our own directories (named with our prefix) from the
    # first one down; the directory above them must already offer them: we do not change it.
    ours = [Path(layout.v2_root)]
    while ours[-1].parent.name.startswith("hetfaas"):
        ours.append(ours[-1].parent)
    parent_control = ours[-1].parent / "cgroup.subtree_control"
    missing = set(CONTROLLERS) - set(parent_control.read_text().split())
    if missing:
        raise CgroupError(
            f"{parent_control} does not enable {' '.join(sorted(missing))}: set cgroup_parent to a "
            "delegated cgroup that does (we never change cgroups we did not create)"
        )
    for directory in reversed(ours):
        Path(directory, "cgroup.subtree_control").write_text(" ".join("+" + c for c in CONTROLLERS))


def _roots(layout: Layout) -> list[str]:
    return ([layout.v2_root] if layout.v2_root else []) + list(layout.v1_roots.values())


def list_slots(layout: Layout) -> set[str]:
    """Slot names present in any hierarchy of our subtree (leftovers after a crash included)."""
    names: set[str] = set()
    for root in _roots(layout):
        try:
            names |= {entry.name for entry in os.scandir(root) if entry.is_dir()}
        except FileNotFoundError:
            pass
    return names


def remove_subtree(layout: Layout) -> None:
    """Kill and remove every slot, our subtree, and its parents that bear our prefix and are empty
    (other nodes of the same cluster may still use them)."""
    for root in _roots(layout):
        if os.path.isdir(root):
            for entry in os.scandir(root):
                if entry.is_dir():
                    _kill_and_remove(Path(entry.path))  # a sandbox just killed may take a moment
        path = Path(root)
        while path.name.startswith("hetfaas"):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                break  # not empty, or still populated: someone else's turn
            path = path.parent


def remove_tree(parent: str) -> int:
    """Remove the cgroup tree `parent` (which must bear our prefix) from every hierarchy, killing
    what still runs in it: `hetfaas down` after a node crashed. Returns how many cgroups went."""
    if not Path(parent).name.startswith("hetfaas"):
        raise ValueError(f"{parent!r} is not one of ours")
    removed = 0
    for point, _fstype, _opts in parse_mountinfo(Path("/proc/self/mountinfo").read_text()):
        top = Path(point, parent.strip("/"))
        if not top.is_dir():
            continue
        for directory, _dirs, _files in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
            removed += _kill_and_remove(Path(directory))
    return removed


def _kill_and_remove(directory: Path) -> int:
    kill_file = directory / "cgroup.kill"  # fine here: the cgroup is removed, never reused
    for _attempt in range(100):
        if kill_file.exists():
            _write(str(directory), "cgroup.kill", 1)
        for pid in (directory / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            directory.rmdir()
            return 1
        except OSError:
            time.sleep(0.01)  # the kernel is still reaping what we killed
    return 0


class SlotMark(NamedTuple):
    oom_kills: int
    cpu_usec: int | None


class Slot:
    def __init__(self, name: str, layout: Layout):
        self.name = name
        self.layout = layout
        self.v2_dir = os.path.join(layout.v2_root, name) if layout.v2_root else None
        self.v1_dirs = {c: os.path.join(root, name) for c, root in layout.v1_roots.items()}

    def dirs(self) -> list[str]:
        return ([self.v2_dir] if self.v2_dir else []) + list(self.v1_dirs.values())

    def create(self) -> None:
        for path in self.dirs():
            os.mkdir(path)

    def exists(self) -> bool:
        return all(os.path.isdir(path) for path in self.dirs())

    def open_v2(self) -> int:
        """An fd of the v2 directory for CLONE_INTO_CGROUP; FileNotFoundError if it vanished."""
        assert self.v2_dir
        return os.open(self.v2_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def procs_files(self, include_v2: bool) -> list[str]:
        """The cgroup.procs files a process must be written into to join this slot."""
        files = [os.path.join(d, "cgroup.procs") for d in self.v1_dirs.values()]
        if include_v2 and self.v2_dir:
            files.insert(0, os.path.join(self.v2_dir, "cgroup.procs"))
        return files

    def apply(self, limits: Limits, current: Limits | None = None) -> None:
        """Set the slot's limits; with `current` (what the slot holds now), write only what differs:
        on the start path every cgroupfs write counts."""
        if current is None or limits.memory_mb != current.memory_mb:
            self._apply_memory(limits.memory_mb * 1024 * 1024)
        if current is None or limits.cpu_millis != current.cpu_millis:
            quota = max(1000, limits.cpu_millis * CPU_PERIOD_US // 1000)
            if self.v2_dir and self.layout.kind == "v2":
                _write(self.v2_dir, "cpu.max", f"{quota} {CPU_PERIOD_US}")
            else:
                _write(self.v1_dirs["cpu"], "cpu.cfs_period_us", CPU_PERIOD_US)
                _write(self.v1_dirs["cpu"], "cpu.cfs_quota_us", quota)
        if current is None or limits.pids_max != current.pids_max:
            directory = self.v2_dir if self.layout.kind == "v2" else self.v1_dirs["pids"]
            assert directory
            _write(directory, "pids.max", limits.pids_max)

    def _apply_memory(self, memory: int) -> None:
        if self.v2_dir and self.layout.kind == "v2":
            _write(self.v2_dir, "memory.max", memory)
            _write(self.v2_dir, "memory.swap.max", 0, optional=True)
            return
        mem = self.v1_dirs["memory"]
        # memsw must stay >= the memory limit: lower memsw after, raise it before (ordering rule of v1)
        _write(mem, "memory.memsw.limit_in_bytes", -1, optional=True)
        _write(mem, "memory.limit_in_bytes", memory)
        _write(mem, "memory.memsw.limit_in_bytes", memory, optional=True)

    def mark(self) -> "SlotMark":
        """What the slot has counted so far, for `since` at the function's end (a slot is reused)."""
        return SlotMark(self.oom_kills(), self.cpu_usec())

    def since(self, mark: "SlotMark") -> tuple[bool, float | None]:
        """(whether the OOM killer struck, CPU seconds used) since `mark`; None where unknown."""
        now = self.cpu_usec()
        cpu_s = (now - mark.cpu_usec) / 1e6 if now is not None and mark.cpu_usec is not None else None
        return self.oom_kills() > mark.oom_kills, cpu_s

    def cpu_usec(self) -> int | None:
        """CPU time of every process the slot has held (its descendants' too), in µs: cgroup v2's
        cpu.stat usage_usec (kept with or without the cpu controller, so on hybrid hosts too),
        v1's cpuacct.usage (ns); None where neither is kept. ~11 µs a read on this VM: a
        prewarmed sandbox is marked when it goes idle, off the start path."""
        try:
            if self.v2_dir:
                with open(os.path.join(self.v2_dir, "cpu.stat"), "rb") as f:
                    first = f.readline()  # usage_usec is the first line
                return int(first.split()[1]) if first.startswith(b"usage_usec ") else None
            directory = self.v1_dirs.get("cpuacct") or self.v1_dirs.get("cpu")
            if directory is None:
                return None
            with open(os.path.join(directory, "cpuacct.usage"), "rb") as f:
                return int(f.read()) // 1000
        except (OSError, ValueError, IndexError):
            return None

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer has killed in this slot, ever."""
        if self.layout.kind == "v2":
            assert self.v2_dir
            path = os.path.join(self.v2_dir, "memory.events")
        else:
            path = os.path.join(self.v1_dirs["memory"], "memory.oom_control")
        try:
            lines = Path(path).read_text().splitlines()
        except FileNotFoundError:
            return 0
        return next((int(line.split()[1]) for line in lines if line.startswith("oom_kill ")), 0)

    def kill(self) -> None:
        """SIGKILL everything in the slot, by pid.

        Not `cgroup.kill`: on this kernel (6.18) a cgroup that was ever killed that way SIGKILLs
        every later child created in it by clone3(CLONE_INTO_CGROUP), so a pooled slot would be
        poisoned for good (bench/RESULTS.md, "kernel quirks"). A sandbox's processes all live in
        its pid namespace, so killing its init takes them all; this sweep catches what is left."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.procs_files(include_v2=True):
            try:
                found |= {int(p) for p in Path(path).read_text().split()}
            except FileNotFoundError:
                pass
        return sorted(found)

    def populated(self) -> bool:
        if self.v2_dir:
            try:
                return "populated 1" in Path(self.v2_dir, "cgroup.events").read_text()
            except FileNotFoundError:
                return False
        return bool(self.pids())

    def events_fd(self) -> int | None:
        """cgroup.events open for poll(POLLPRI), which fires when `populated` changes (v2 only)."""
        if not self.v2_dir:
            return None
        return os.open(os.path.join(self.v2_dir, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)

    def is_clean(self) -> bool:
        """Empty, and holding no cgroups of its own (a recycled slot must be as good as new)."""
        return (
            self.exists()
            and not self.populated()
            and not any(entry.is_dir() for d in self.dirs() for entry in os.scandir(d))
        )

    def remove(self) -> None:
        """rmdir an empty slot (what is already gone is fine)."""
        for path in self.dirs():
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass

    def destroy(self) -> None:
        """Kill whatever still runs in the slot and remove it, waiting for the kernel to reap: for
        slots that are not coming back (leftovers nobody adopts)."""
        for path in self.dirs():
            if os.path.isdir(path):
                _kill_and_remove(Path(path))


def attach(procs_file: str, pid: int) -> None:
    """Move a process into a cgroup (the write that takes the kernel's global threadgroup lock)."""
    _write(os.path.dirname(procs_file), os.path.basename(procs_file), pid)


def nr_dying(layout: Layout) -> int:
    """Cgroups of ours the kernel is still tearing down (v2 counts them; v1 has no such counter)."""
    if not layout.v2_root:
        return 0
    try:
        text = Path(layout.v2_root, "cgroup.stat").read_text()
    except FileNotFoundError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "nr_dying_descendants":
            return int(value)
    return 0


def _write(directory: str, name: str, value: object, optional: bool = False) -> None:
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if optional and os.path.isdir(directory):
            return
        raise
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)
