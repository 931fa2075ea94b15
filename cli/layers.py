"""A python function's dependencies as a layer, built on the deploying side.

The requirements (`[python] requirements` in function.toml, or `requirements.txt` beside it) are
resolved and installed by pip into a directory of their own, from wheels only (no package's build
script runs, here or on a node), compiled to bytecode that needs no writable directory and no
timestamps (unchecked-hash .pyc), and packed reproducibly like a bundle: the same requirements
resolved to the same wheels give the same layer, under the same digest. A layer is built once per
distinct requirement set and kept in the deployer's cache; the store keeps it once for every
function that has the same one. Nodes fetch it like a bundle and mount it read-only at /deps.

pip's own configuration applies (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, pip.conf).
"""

import compileall
import hashlib
import json
import os
import platform
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import msgspec

from fabric.bundles import BundleError, digest_of, pack_directory
from schemas.manifest import requirements_problems
from schemas.messages import FunctionSpec, PythonSpec

REQUIREMENTS_FILE = "requirements.txt"
# A layer as stored (tar.gz): the scheduler's max_layer_bytes refuses more, with its own number;
# this is the client's bound while packing (so a huge set fails before it is uploaded).
MAX_LAYER_BYTES = 64 * 1024 * 1024
PART_BYTES = 4 * 1024 * 1024  # an upload message's part: well under NATS's max_payload (8 MiB)
PIP_TIMEOUT_S = 900.0
# pip's words for a requirement it cannot satisfy: what the deploy error names
NOT_FOUND = re.compile(
    r"(?:No matching distribution found for|Could not find a version that satisfies the requirement) (\S+)"
)

Progress = Callable[[str], None]


class LayerError(Exception):
    """The layer cannot be built: the message names the requirement and says why."""


class Layer(msgspec.Struct, frozen=True):
    digest: str
    data: bytes
    cached: bool  # taken from the deployer's cache: not built again


def target() -> str:
    """What a layer is built for: this interpreter's version and this machine's platform (the
    nodes' must be the same; docs/architecture.md §4)."""
    return (
        f"cp{sys.version_info.major}{sys.version_info.minor}-{platform.system().lower()}_{platform.machine()}"
    )


def with_requirements(spec: FunctionSpec, directory: Path) -> FunctionSpec:
    """The spec with its requirements from `requirements.txt` when the manifest names none
    (LayerError if both do)."""
    path = directory / REQUIREMENTS_FILE
    if spec.runtime != "python" or not path.is_file():
        return spec
    if spec.python is not None and spec.python.requirements:
        raise LayerError(f"requirements are given twice: in function.toml's [python] table and in {path}")
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    requirements = [line for line in lines if line]
    if problems := requirements_problems(requirements):
        raise LayerError(f"{path}: " + "; ".join(problems))
    return msgspec.structs.replace(spec, python=PythonSpec(requirements=requirements))


def requirement_key(requirements: list[str]) -> str:
    """The requirement set's name in the cache: the same set in any order, for the same target."""
    canonical = json.dumps([target(), sorted(set(requirements))])
    return hashlib.sha256(canonical.encode()).hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hetfaas" / "layers"


def build(requirements: list[str], progress: Progress, cache: Path | None = None) -> Layer:
    """The layer of `requirements`: from the cache, else resolved and built (LayerError naming
    the requirement that cannot be had as a wheel, or a layer over MAX_LAYER_BYTES)."""
    cache = cache or cache_dir()
    cached = cache / f"{requirement_key(requirements)}.tar.gz"
    if cached.is_file():
        data = cached.read_bytes()
        progress(f"layer for {len(requirements)} requirements: in the cache ({len(data) >> 10} KiB)")
        return Layer(digest_of(data), data, cached=True)
    with tempfile.TemporaryDirectory(prefix="hetfaas-layer-") as tmp:
        root = Path(tmp) / "layer"
        _install(requirements, root, Path(tmp), progress)
        shutil.rmtree(root / "bin", ignore_errors=True)  # scripts whose #! names this machine's python
        progress("compiling the layer's bytecode")
        compileall.compile_dir(
            root, quiet=1, ddir="/deps", invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH
        )
        try:
            data = pack_directory(root, MAX_LAYER_BYTES, keep_bytecode=True)
        except BundleError as exc:  # over the bound
            raise LayerError(f"the layer of {', '.join(requirements)} is too large: {exc}") from None
    cache.mkdir(parents=True, exist_ok=True)
    staging = cached.with_suffix(".new")
    staging.write_bytes(data)
    staging.rename(cached)
    progress(f"layer built: {len(data) >> 10} KiB packed")
    return Layer(digest_of(data), data, cached=False)


def _install(requirements: list[str], root: Path, work: Path, progress: Progress) -> None:
    listed = work / REQUIREMENTS_FILE
    listed.write_text("\n".join(requirements) + "\n")
    command = [sys.executable, "-m", "pip", "install", "--only-binary=:all:", "--target", str(root)]
    command += ["--no-compile", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    command += ["--no-warn-script-location", "-r", str(listed)]
    progress(f"resolving {len(requirements)} requirements with pip (wheels only, for {target()})")
    try:
        done = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        raise LayerError(f"cannot run pip to build the layer: {exc}") from None
    assert done.stdout is not None
    for line in done.stdout:
        if line.startswith(("Collecting", "Downloading", "Successfully installed", "Using cached")):
            progress("  " + line.strip())
    errors = done.stderr.read() if done.stderr else ""
    if done.wait(PIP_TIMEOUT_S) != 0:
        raise LayerError(why_not(errors))


def why_not(pip_errors: str) -> str:
    """pip's failure as a deploy error: the requirement it could not satisfy, by name."""
    if found := NOT_FOUND.search(pip_errors):
        return (
            f"requirement {found.group(1)!r} cannot be resolved, or has no wheel for {target()} "
            f"(source distributions are not built): pip said: {found.group(0)}"
        )
    lines = [
        line for line in pip_errors.strip().splitlines() if line.startswith("ERROR")
    ] or pip_errors.splitlines()
    return "pip could not build the layer: " + (" ".join(lines[-3:]) or "it failed without saying why")


def parts(data: bytes) -> list[bytes]:
    """The layer in pieces that each fit one upload message."""
    return [data[at : at + PART_BYTES] for at in range(0, len(data), PART_BYTES)] or [b""]
