"""docs/architecture.md is the map of the code: its subject and etcd key tables must be exactly
what `schemas/subjects.py` and `schemas/keys.py` build, and it must name every package."""

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from schemas import keys, subjects

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "architecture.md").read_text()
NOT_BUILDERS = {
    "parse_invoke",
    "batched",
    "is_replica_invoke",
    "parse_function",
    "parse_program",
    "parse_control",
    "parse_verify",
    "is_tenant_reply",
    "reply_is_the_tenants",
}


def table(marker: str) -> set[str]:
    """The first column of the table between `<!-- marker: ... -->` and `<!-- /marker -->`."""
    block = DOC[DOC.index(f"<!-- {marker}:") : DOC.index(f"<!-- /{marker} -->")]
    return set(re.findall(r"^\| `([^`]+)` \|", block, re.MULTILINE))


def built(module: ModuleType, constant: Callable[[str, object], bool]) -> set[str]:
    """Every constant of the module, and every builder called with `<parameter>` placeholders."""
    names = {value for name, value in vars(module).items() if name.isupper() and constant(name, value)}
    for name, function in inspect.getmembers(module, inspect.isfunction):
        if function.__module__ == module.__name__ and name not in NOT_BUILDERS:
            names.add(function(*(f"<{p}>" for p in inspect.signature(function).parameters)))
    return names


def test_the_subject_table_is_the_schemas_subject_table() -> None:
    def is_subject(name: str, value: object) -> bool:  # not a token of one (verbs, the batch token)
        return isinstance(value, str) and name != "BATCH_TOKEN" and value not in subjects.CONTROL_VERBS

    assert table("subjects") == built(subjects, is_subject)


def test_the_key_table_is_the_schemas_key_layout() -> None:
    assert table("keys") == built(keys, lambda name, value: isinstance(value, str))


def test_every_package_has_a_room_in_the_document() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    missing = {p for p in packages if f"`{p}/`" not in DOC}
    assert packages and not missing


def test_the_readme_links_only_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", readme)
    assert "docs/architecture.md" in targets
    outside = [t for t in targets if t.startswith(("..", "/")) or not (ROOT / t.split("#")[0]).exists()]
    assert not outside
