"""`function.toml` -> FunctionSpec, with every problem named. Pure: text in, spec or errors out.

Used by the CLI (to fail before uploading anything) and by the scheduler (never trust a client).
"""

import re
import tomllib

import msgspec
from packaging.requirements import InvalidRequirement, Requirement

from schemas.ebpf import PROG_TYPES
from schemas.messages import EbpfSpec, FunctionSpec, PythonSpec

# Names become NATS subject tokens and etcd key segments: no dots, spaces or wildcards.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
HANDLER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
LIMITS = {
    "memory_mb": (16, 16_384),
    "timeout_ms": (1, 900_000),
    "concurrency": (1, 1_000),
    "max_concurrency": (0, 100_000),
}
ALLOWED_KEYS = frozenset(FunctionSpec.__struct_fields__)
ALLOWED_EBPF_KEYS = frozenset(EbpfSpec.__struct_fields__)
ALLOWED_PYTHON_KEYS = frozenset(PythonSpec.__struct_fields__)
MAX_REQUIREMENTS = 200
MAX_REQUIREMENT_LENGTH = 200


class ManifestError(ValueError):
    """An invalid function manifest; `problems` lists every reason, one per line of the message."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_manifest(text: str) -> FunctionSpec:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError([f"function.toml is not valid TOML: {exc}"]) from None
    if problems := _table_problems(doc):
        raise ManifestError(problems)
    if doc.get("runtime") == "ebpf":
        doc.setdefault("placement", "dpu")  # eBPF functions are what DPUs are for
    try:
        spec = msgspec.convert(doc, FunctionSpec)
    except msgspec.ValidationError as exc:
        raise ManifestError([str(exc)]) from None
    problems = spec_problems(spec)
    if problems:
        raise ManifestError(problems)
    return spec


def _table_problems(doc: dict) -> list[str]:
    """Unknown keys, at the top and in the [ebpf] table (EbpfSpec itself takes unknown fields:
    it travels on the wire, where a field added later must not break an older reader), and a
    program type that is not offered (said plainly, before the conversion names the enum)."""
    problems = _unknown(doc, ALLOWED_KEYS, "")
    if isinstance(python := doc.get("python"), dict):
        problems += _unknown(python, ALLOWED_PYTHON_KEYS, " in [python]")
    table = doc.get("ebpf")
    if isinstance(table, dict):
        problems += _unknown(table, ALLOWED_EBPF_KEYS, " in [ebpf]")
        prog_type = table.get("prog_type", "xdp")
        if prog_type not in PROG_TYPES:
            problems.append(
                f"prog_type {prog_type!r} is not offered (one of {', '.join(sorted(PROG_TYPES))})"
            )
    return problems


def _unknown(table: dict, allowed: frozenset[str], where: str) -> list[str]:
    unknown = sorted(set(table) - allowed)
    if not unknown:
        return []
    noun = "key" if len(unknown) == 1 else "keys"
    names = ", ".join(repr(k) for k in unknown)
    return [f"unknown {noun} {names}{where} (allowed: {', '.join(sorted(allowed))})"]


def spec_problems(spec: FunctionSpec) -> list[str]:
    """Everything wrong with a spec; empty when it is deployable."""
    problems = name_problems(name=spec.name, tenant=spec.tenant)
    for field, (low, high) in LIMITS.items():
        value = getattr(spec, field)
        if not low <= value <= high:
            problems.append(f"{field} = {value} is outside {low}..{high}")
    if spec.placement == "dpu" and spec.runtime != "ebpf":
        problems.append(f"placement 'dpu' needs runtime 'ebpf'; a {spec.runtime} function runs on hosts")
    if spec.payload != "bytes" and spec.runtime != "python":
        problems.append(
            f'payload = "{spec.payload}" is for python handlers; a {spec.runtime} function takes bytes'
        )
    problems.extend(_runtime_problems(spec))
    return problems


def name_problems(**names: str) -> list[str]:
    """What is wrong with each name given (`tenant=..., name=...`); empty when all are valid."""
    return [
        f"{field} {value!r} must match {NAME_RE.pattern}"
        for field, value in names.items()
        if not NAME_RE.match(value)
    ]


def _runtime_problems(spec: FunctionSpec) -> list[str]:
    if spec.runtime == "ebpf":
        return _ebpf_problems(spec)
    if spec.ebpf is not None:
        return [f"the [ebpf] table is for ebpf functions, not {spec.runtime}"]
    if spec.python is not None and spec.runtime != "python":
        return [f"the [python] table is for python functions, not {spec.runtime}"]
    if spec.runtime == "python":
        if spec.python is not None and (problems := requirements_problems(spec.python.requirements)):
            return problems
        if spec.command is not None:
            return ["'command' is for exec functions; python functions take 'handler'"]
        if spec.handler is None:
            return ['python functions need handler = "module:function"']
        if not HANDLER_RE.match(spec.handler):
            return [f'handler {spec.handler!r} must look like "module:function"']
        return []
    if spec.handler is not None:
        return ["'handler' is for python functions; exec functions take 'command'"]
    if not spec.command or not all(spec.command):
        return ['exec functions need command = ["program", "arg", ...] (non-empty)']
    return []


def _ebpf_problems(spec: FunctionSpec) -> list[str]:
    if spec.handler is not None or spec.command is not None:
        return ["ebpf functions take an [ebpf] table, not 'handler' or 'command'"]
    if spec.ebpf is None:
        return ['ebpf functions need an [ebpf] table: object = "prog.o", program = "...", prog_type = "xdp"']
    if spec.placement == "host":
        return ["ebpf functions run on DPUs: placement must be 'dpu' or 'any'"]
    if spec.ebpf.object.startswith("/") or ".." in spec.ebpf.object.split("/"):
        return [f"object {spec.ebpf.object!r} must be a path inside the function's directory"]
    return []


def requirements_problems(requirements: list[str]) -> list[str]:
    """What is wrong with a python function's requirements: each must be a PEP 508 name with
    versions, extras and markers, never a URL or a path (those are built from source, and the
    layer takes wheels only)."""
    if len(requirements) > MAX_REQUIREMENTS:
        return [f"{len(requirements)} requirements, over the {MAX_REQUIREMENTS} a function may have"]
    problems = []
    for line in requirements:
        if len(line) > MAX_REQUIREMENT_LENGTH:
            problems.append(
                f"requirement {line[:40]!r}... is longer than {MAX_REQUIREMENT_LENGTH} characters"
            )
            continue
        try:
            parsed = Requirement(line)
        except InvalidRequirement as exc:
            problems.append(f"requirement {line!r} is not a PEP 508 requirement: {str(exc).splitlines()[0]}")
            continue
        if parsed.url:
            problems.append(
                f"requirement {line!r} names a URL: only packages from an index (as wheels) are taken"
            )
    return problems
