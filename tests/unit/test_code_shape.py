"""The codebase stays a map (docs/architecture.md, "Conventions"): every concern has a room of
its own, so no class, module or function grows past the size at which it holds several, and no
service package reaches into another's rooms (what two services share lives in `fabric`,
`schemas` or `ebpf_runtime`)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODE = ["cli", "deploy", "dpu_node", "ebpf_runtime", "fabric", "host_node", "scheduler", "schemas"]
CODE += ["verifier_service"]
SERVICES = {"scheduler", "host_node", "dpu_node", "verifier_service"}
MAX_MODULE_LINES = 550
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> list[Path]:
    return sorted(p for package in CODE for p in (ROOT / package).rglob("*.py"))


def test_the_code_is_where_the_test_looks() -> None:
    assert len(modules()) > 80
    assert {p.relative_to(ROOT).parts[0] for p in modules()} == set(CODE)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sizes(path: Path) -> None:
    source = path.read_text()
    too_big = []
    if (lines := source.count("\n")) > MAX_MODULE_LINES:
        too_big.append(f"module: {lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        if isinstance(node, ast.ClassDef) and length > MAX_CLASS_LINES:
            too_big.append(f"class {node.name}: {length} lines (at most {MAX_CLASS_LINES})")
        if not isinstance(node, ast.ClassDef) and length > MAX_FUNCTION_LINES:
            too_big.append(f"function {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert not too_big, f"{path.relative_to(ROOT)}: give a piece with its own state its own module"


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_service_imports_another(service: str) -> None:
    crossing = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & (SERVICES - {service}))
        for path in (ROOT / service).rglob("*.py")
    }
    assert not {path: found for path, found in crossing.items() if found}


@pytest.mark.parametrize("shared", ["fabric", "schemas", "ebpf_runtime"])
def test_shared_packages_import_no_service(shared: str) -> None:
    for path in (ROOT / shared).rglob("*.py"):
        assert not imported_packages(path) & SERVICES, path.relative_to(ROOT)
