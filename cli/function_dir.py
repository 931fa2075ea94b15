"""A function's directory as `hetfaas deploy` reads it: the manifest, the requirements, the
bundle, an eBPF function's object."""

from pathlib import Path

from cli import layers
from fabric.bundles import pack_directory
from schemas.manifest import parse_manifest
from schemas.messages import FunctionSpec

MANIFEST = "function.toml"
# A bundle travels to the scheduler (the bundle store's only writer) in one message, under the
# bus's 8 MiB limit on a tenant's messages.
MAX_BUNDLE_BYTES = 6 * 1024 * 1024


class FunctionDirError(ValueError):
    """What is missing or wrong in the directory (the manifest's own problems are ManifestError)."""


def read(path: Path) -> tuple[FunctionSpec, bytes]:
    """The spec from `function.toml` (a python function's requirements from requirements.txt
    if it has one) and the packed bundle of its directory."""
    manifest = path if path.is_file() else path / MANIFEST
    if not manifest.is_file():
        raise FunctionDirError(f"no {MANIFEST} at {path}")
    try:
        spec = layers.with_requirements(parse_manifest(manifest.read_text()), manifest.parent)
    except layers.LayerError as exc:
        raise FunctionDirError(str(exc)) from None
    return spec, pack_directory(manifest.parent, MAX_BUNDLE_BYTES)


def ebpf_object(path: Path, spec: FunctionSpec) -> bytes:
    assert spec.ebpf is not None
    obj = (path if path.is_dir() else path.parent) / spec.ebpf.object
    if not obj.is_file():
        raise FunctionDirError(f"the object {obj} does not exist (build it first)")
    return obj.read_bytes()
