"""Build the eBPF examples (make-free): every examples/*/function.toml with an [ebpf] table gets its
object compiled from the C file beside it, when the object is missing or older than the source.

    .venv/bin/python -m deploy.build_ebpf [DIR ...]
"""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

FLAGS = ["-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def build(directory: Path, clang: str) -> Path | None:
    manifest = tomllib.loads((directory / "function.toml").read_text())
    if manifest.get("runtime") != "ebpf":
        return None
    target = directory / manifest["ebpf"]["object"]
    sources = sorted(directory.glob("*.c"))
    if len(sources) != 1:
        raise SystemExit(f"{directory}: expected one .c file beside function.toml, found {len(sources)}")
    if target.exists() and target.stat().st_mtime >= sources[0].stat().st_mtime:
        return target
    subprocess.run([clang, *FLAGS, "-c", str(sources[0]), "-o", str(target)], check=True)
    return target


def main() -> None:
    clang = shutil.which("clang")
    if clang is None:
        raise SystemExit("clang is not installed (deploy/setup.sh installs it)")
    examples = sorted(manifest.parent for manifest in EXAMPLES.glob("*/function.toml"))
    directories = [Path(arg) for arg in sys.argv[1:]] or examples
    for directory in directories:
        if (built := build(directory, clang)) is not None:
            print(built)


if __name__ == "__main__":
    main()
