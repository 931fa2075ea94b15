import io
import os
import tarfile
from pathlib import Path

import pytest

from fabric import bundles
from fabric.bundles import BundleError, digest_of, pack_directory, unpack


def write_tree(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "main.py").write_text("x = 1\n")
    (root / "pkg" / "util.py").write_text("y = 2\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"junk")


def test_packing_is_reproducible_and_skips_caches(tmp_path: Path) -> None:
    write_tree(tmp_path / "a")
    first = pack_directory(tmp_path / "a", 1 << 20)
    os.utime(tmp_path / "a" / "main.py", (0, 12345))
    (tmp_path / "a" / "__pycache__" / "other.pyc").write_bytes(b"more junk")
    second = pack_directory(tmp_path / "a", 1 << 20)
    assert digest_of(first) == digest_of(second)

    unpack(first, tmp_path / "out")
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert names == ["main.py", "pkg/util.py", "run.sh"]
    assert os.access(tmp_path / "out" / "run.sh", os.X_OK)


def test_size_limit(tmp_path: Path) -> None:
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "blob").write_bytes(os.urandom(4096))
    with pytest.raises(BundleError, match=r"over the 1000 limit|larger than 1000"):
        pack_directory(tmp_path / "big", 1000)


def hostile_bundle(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("../escape.txt"),
        tarfile.TarInfo("/etc/evil"),
        (lambda m: (setattr(m, "type", tarfile.SYMTYPE), setattr(m, "linkname", "/etc/passwd"), m)[-1])(
            tarfile.TarInfo("link")
        ),
    ],
)
def test_unpack_refuses_anything_but_files_inside(tmp_path: Path, member: tarfile.TarInfo) -> None:
    with pytest.raises(BundleError, match="not a plain file inside"):
        unpack(hostile_bundle(member, b"x"), tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists()


def test_digest_format() -> None:
    assert digest_of(b"") == "sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def many(names: list[str], size: int = 1) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
    return buf.getvalue()


def test_bounds_on_what_a_bundle_unpacks_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = "/".join(["d"] * bundles.MAX_DEPTH) + "/f"
    with pytest.raises(BundleError, match="deeper than"):
        bundles.check(many([deep]))
    monkeypatch.setattr(bundles, "MAX_FILES", 3)
    with pytest.raises(BundleError, match="more than 3 files"):
        unpack(many(["a", "b", "c", "d"]), tmp_path / "files")
    monkeypatch.setattr(bundles, "MAX_UNPACKED_BYTES", 1000)
    with pytest.raises(BundleError, match="unpacks to more than"):
        unpack(many(["a", "b"], size=600), tmp_path / "bytes")
    assert not (tmp_path / "bytes").exists() or not any((tmp_path / "bytes").iterdir())
    with pytest.raises(BundleError, match=r"not a readable tar\.gz"):
        bundles.check(b"\x1f\x8b not really gzip")
    unpack(many(["a", "b"], size=400), tmp_path / "fits")
    assert sorted(p.name for p in (tmp_path / "fits").iterdir()) == ["a", "b"]
