"""Dependency layers: requirements read and checked, the build's cache key, pip's failures named,
and the scheduler's assembly of a layer from its parts (against a store in memory)."""

from pathlib import Path

import pytest

from cli import layers
from fabric.bundles import PART_PREFIX, BundleError, digest_of, pack_directory
from scheduler.layers import LayerAssembly, LayerRefused
from schemas.manifest import ManifestError, parse_manifest, requirements_problems
from schemas.messages import FunctionSpec, PythonSpec

SPEC = FunctionSpec(name="f", runtime="python", handler="h:handle")


def test_requirements_come_from_requirements_txt_without_comments(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("# pinned\njinja2==3.1.4  # templates\n\nnumpy>=2\n")
    spec = layers.with_requirements(SPEC, tmp_path)
    assert spec.python == PythonSpec(requirements=["jinja2==3.1.4", "numpy>=2"])
    assert layers.with_requirements(SPEC, tmp_path / "absent") == SPEC


def test_requirements_in_two_places_or_not_pep508_are_refused(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("jinja2\n")
    with pytest.raises(layers.LayerError, match="given twice"):
        layers.with_requirements(
            FunctionSpec(**{**_fields(SPEC), "python": PythonSpec(requirements=["x"])}), tmp_path
        )
    (tmp_path / "requirements.txt").write_text("-e ./local\n")
    with pytest.raises(layers.LayerError, match="not a PEP 508 requirement"):
        layers.with_requirements(SPEC, tmp_path)


def _fields(spec: FunctionSpec) -> dict:
    return {name: getattr(spec, name) for name in spec.__struct_fields__}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("pkg @ https://example.invalid/pkg.whl", "names a URL"),
        ("git+https://example.invalid/pkg", "not a PEP 508"),
        ("--index-url https://example.invalid", "not a PEP 508"),
        ("x" * 300, "longer than"),
    ],
)
def test_requirements_that_would_be_built_from_source_are_refused(line: str, problem: str) -> None:
    assert problem in requirements_problems([line])[0]
    assert requirements_problems(["jinja2==3.1.4", "numpy>=2; python_version >= '3.10'", "pkg[extra]"]) == []


def test_the_manifest_takes_a_python_table_for_python_only() -> None:
    spec = parse_manifest(
        'name = "f"\nruntime = "python"\nhandler = "h:handle"\n[python]\nrequirements = ["jinja2"]\n'
    )
    assert spec.python == PythonSpec(requirements=["jinja2"])
    with pytest.raises(ManifestError, match=r"\[python\] table is for python"):
        parse_manifest('name = "f"\nruntime = "exec"\ncommand = ["x"]\n[python]\nrequirements = ["jinja2"]\n')
    with pytest.raises(ManifestError, match="unknown key 'index'"):
        parse_manifest('name = "f"\nruntime = "python"\nhandler = "h:handle"\n[python]\nindex = "x"\n')


def test_a_requirement_set_is_one_cache_entry_in_any_order() -> None:
    assert layers.requirement_key(["b", "a"]) == layers.requirement_key(["a", "b", "a"])
    assert layers.requirement_key(["a"]) != layers.requirement_key(["a==1"])


def test_pips_failure_names_the_requirement() -> None:
    said = (
        "ERROR: Could not find a version that satisfies the requirement nothere==1.0 (from versions: none)\n"
        "ERROR: No matching distribution found for nothere==1.0\n"
    )
    why = layers.why_not(said)
    assert "requirement 'nothere==1.0' cannot be resolved, or has no wheel" in why
    assert "pip could not build the layer: ERROR: boom" == layers.why_not("noise\nERROR: boom\n")


def test_a_layer_is_sent_in_parts_that_fit_a_message() -> None:
    data = bytes(range(256)) * (layers.PART_BYTES // 128)
    pieces = layers.parts(data)
    assert len(pieces) == 2 and b"".join(pieces) == data and all(len(p) <= layers.PART_BYTES for p in pieces)


def test_bytecode_is_kept_in_a_layer_only(tmp_path: Path) -> None:
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "m.py").write_text("x = 1\n")
    (tmp_path / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"pyc")
    assert pack_directory(tmp_path, 1 << 20) != pack_directory(tmp_path, 1 << 20, keep_bytecode=True)
    assert pack_directory(tmp_path, 1 << 20, keep_bytecode=True) == pack_directory(
        tmp_path, 1 << 20, keep_bytecode=True
    )


class MemoryStore:
    """The bundle store's calls LayerAssembly makes, in memory."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.uploaded: list[str] = []

    async def fetch(self, digest: str, prefix: str = "") -> bytes:
        if prefix + digest not in self.objects:
            raise BundleError(f"bundle {digest} is not in the bundle store")
        return self.objects[prefix + digest]

    async def upload(self, data: bytes, prefix: str = "") -> str:
        self.objects[prefix + digest_of(data)] = data
        self.uploaded.append(prefix + digest_of(data))
        return digest_of(data)

    async def delete(self, digest: str, prefix: str = "") -> None:
        self.objects.pop(prefix + digest, None)


def stored_parts(store: MemoryStore, data: bytes, size: int) -> list[str]:
    names = []
    for at in range(0, len(data), size):
        piece = data[at : at + size]
        store.objects[PART_PREFIX + digest_of(piece)] = piece
        names.append(digest_of(piece))
    return names


@pytest.mark.parametrize("part_bytes", [100, 1 << 20])
async def test_parts_are_joined_checked_stored_and_dropped(tmp_path: Path, part_bytes: int) -> None:
    """In many parts, or in one (stored as a part, under a name no bundle has)."""
    (tmp_path / "pkg.py").write_bytes(b"x = 1\n" * 50_000)
    layer = pack_directory(tmp_path, 1 << 24)
    store = MemoryStore()
    names = stored_parts(store, layer, part_bytes)
    await LayerAssembly(store, 1 << 20).assemble(digest_of(layer), names)  # type: ignore[arg-type]
    assert store.objects == {digest_of(layer): layer}


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "was not uploaded"),
        ("digest", "do not hash to"),
        ("not_tar", "cannot be deployed"),
        ("big", "over the limit of 1 MiB"),
    ],
)
async def test_a_layer_that_breaks_a_rule_is_refused_with_the_rule(case: str, reason: str) -> None:
    store = MemoryStore()
    data = b"\x1f\x8b not a tar" if case == "not_tar" else b"y" * ((2 << 20) if case == "big" else 1000)
    names = stored_parts(store, data, 1 << 19)
    digest = digest_of(data)
    if case == "missing":
        names.append(digest_of(b"never uploaded"))
    if case == "digest":
        digest = digest_of(b"something else")
    with pytest.raises(LayerRefused, match=reason):
        await LayerAssembly(store, 1 << 20).assemble(digest, names)  # type: ignore[arg-type]
    assert store.uploaded == [], "nothing is stored as a layer"
