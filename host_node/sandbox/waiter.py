"""Building and finding hetfaas-waiter, the small C program that ends every sandbox start.

`python -m host_node.sandbox.waiter` builds it (deploy/setup.sh does); a node builds it on start
when it is missing or older than its source and a C compiler is at hand."""

import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("hetfaas-waiter.c")
BINARY = Path(__file__).with_name("bin") / "hetfaas-waiter"
VIEW = "/opt/hetfaas/bin/hetfaas-waiter"  # where a sandbox sees it


class WaiterMissing(RuntimeError):
    pass


def ensure_built() -> Path:
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise WaiterMissing(f"{BINARY} is missing and there is no C compiler: run deploy/setup.sh")
    return build(compiler, BINARY)


def build(compiler: str, binary: Path, *extra: str) -> Path:
    """Compile the waiter with `compiler` (a cross compiler for a DPU's Arm, with `-static`)."""
    binary.parent.mkdir(exist_ok=True)
    staging = binary.with_suffix(".new")
    result = subprocess.run(
        [compiler, "-O2", "-Wall", "-Wextra", "-Werror", *extra, "-o", str(staging), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise WaiterMissing(f"cannot build {binary}: {result.stderr.strip()}")
    staging.chmod(0o755)
    staging.replace(binary)  # atomic: a node starting meanwhile sees the old or the new one
    return binary


if __name__ == "__main__":
    print(ensure_built())
