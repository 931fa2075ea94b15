"""runc and crun baselines: a minimal busybox-static container running `true`, with the same
limits our sandboxes get (memory, cpu, pids), each container in its own absolute cgroup path.

On hybrid hosts crun refuses to run (it sees controllers in cgroup2), so it runs in a private
mount namespace with the cgroup2 mount unmounted there (docs/architecture.md §10); that wrapper is
part of its measured cost (about 4 ms)."""

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

PACKAGES = {"runc": "runc", "crun": "crun", "busybox": "busybox-static"}
CGROUP_PARENT = "hetfaas-bench-containers"


def ensure_installed() -> None:
    missing = [package for command, package in PACKAGES.items() if shutil.which(command) is None]
    if missing:
        print(f"installing {' '.join(missing)} (apt-get) for the container baselines", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, stdout=subprocess.DEVNULL)


def make_rootfs(work: Path) -> Path:
    rootfs = work / "rootfs"
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    busybox = rootfs / "bin" / "busybox"
    shutil.copy(shutil.which("busybox") or "/bin/busybox", busybox)
    for applet in ("true", "sh"):
        link = rootfs / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    for directory in ("proc", "dev", "sys", "tmp"):
        (rootfs / directory).mkdir(exist_ok=True)
    return rootfs


def make_bundle(work: Path, rootfs: Path, index: int, memory_mb: int, cpu_millis: int, pids: int) -> Path:
    """One bundle per concurrent slot: each needs its own cgroupsPath."""
    bundle = work / f"bundle-{index}"
    bundle.mkdir(exist_ok=True)
    if not (bundle / "config.json").exists():
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True, capture_output=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["process"]["args"] = ["/bin/true"]
    config["process"]["terminal"] = False
    config["linux"]["cgroupsPath"] = f"/{CGROUP_PARENT}/c{index}"
    config["linux"]["resources"] = {
        "memory": {"limit": memory_mb * 1024 * 1024},
        "cpu": {"quota": cpu_millis * 100, "period": 100_000},
        "pids": {"limit": pids},
    }
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def hybrid_cgroups() -> bool:
    try:
        controllers = Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().split()
    except FileNotFoundError:
        return False
    return bool(controllers)


def command(runtime: str, bundle: Path) -> list[str]:
    run = [runtime, "run", "--bundle", str(bundle), f"bench-{uuid.uuid4().hex[:12]}"]
    if runtime == "crun" and hybrid_cgroups():
        script = 'umount /sys/fs/cgroup/unified && exec "$@"'
        return ["unshare", "-m", "sh", "-c", script, "sh", *run]
    return run


def cleanup() -> None:
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / CGROUP_PARENT
        if top.is_dir():
            for child in top.iterdir():
                if child.is_dir():
                    os.rmdir(child)
            os.rmdir(top)
