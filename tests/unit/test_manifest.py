import typing

import msgspec
import pytest

from schemas.ebpf import PROG_TYPES, ProgType
from schemas.manifest import ManifestError, parse_manifest
from schemas.messages import EbpfSpec

PY = 'name = "fn"\nruntime = "python"\nhandler = "main:handle"\n'
EXEC = 'name = "fn"\nruntime = "exec"\ncommand = ["./run.sh", "--fast"]\n'
EBPF = 'name = "fn"\nruntime = "ebpf"\n[ebpf]\nobject = "prog.o"\nprog_type = "xdp"\n'


def test_defaults_fill_in() -> None:
    spec = parse_manifest(PY)
    assert (spec.tenant, spec.memory_mb, spec.timeout_ms, spec.concurrency, spec.placement) == (
        "default",
        128,
        3000,
        8,
        "host",
    )


def test_exec_manifest() -> None:
    assert parse_manifest(EXEC).command == ["./run.sh", "--fast"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (PY + "colour = 1\n", "unknown key 'colour'"),
        (PY + "a = 1\nb = 2\n", "unknown keys 'a', 'b' (allowed: command,"),
        ('name = "fn"\nruntime = "python"\n', "python functions need handler"),
        ('name = "fn"\nruntime = "python"\nhandler = "nocolon"\n', 'must look like "module:function"'),
        ('name = "fn"\nruntime = "python"\nhandler = "a:b"\ncommand = ["x"]\n', "'command' is for exec"),
        ('name = "fn"\nruntime = "exec"\n', "exec functions need command"),
        ('name = "fn"\nruntime = "exec"\ncommand = [""]\n', "exec functions need command"),
        ('name = "fn"\nruntime = "exec"\ncommand = ["x"]\nhandler = "a:b"\n', "'handler' is for python"),
        ('name = "fn"\nruntime = "ruby"\n', "Invalid enum value 'ruby'"),
        ('runtime = "python"\nhandler = "a:b"\n', "missing required field `name`"),
        ('name = "Fn.x"\nruntime = "exec"\ncommand = ["x"]\n', "name 'Fn.x' must match"),
        (EXEC + 'tenant = "a b"\n', "tenant 'a b' must match"),
        (EXEC + "memory_mb = 8\n", "memory_mb = 8 is outside 16..16384"),
        (EXEC + "concurrency = 0\n", "concurrency = 0 is outside"),
        (EXEC + 'placement = "dpu"\n', "placement 'dpu' needs runtime 'ebpf'"),
        (EXEC + 'timeout_ms = "fast"\n', "Expected `int`, got `str`"),
        ("name = \n", "not valid TOML"),
        (EXEC + 'payload = "json"\n', 'payload = "json" is for python handlers'),
        (
            EBPF + 'colour = "red"\n',
            "unknown key 'colour' in [ebpf] (allowed: object, prog_type, program, verify_mode)",
        ),
        (EBPF.replace('"xdp"', '"kprobe"'), "prog_type 'kprobe' is not offered (one of sched_cls,"),
    ],
)
def test_invalid_manifests_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ManifestError) as excinfo:
        parse_manifest(text)
    assert problem in str(excinfo.value)


def test_every_problem_is_listed() -> None:
    with pytest.raises(ManifestError) as excinfo:
        parse_manifest('name = "BAD"\nruntime = "exec"\nmemory_mb = 1\n')
    assert len(excinfo.value.problems) == 3


def test_an_ebpf_table_reaches_the_spec() -> None:
    spec = parse_manifest(EBPF)
    assert spec.ebpf is not None and (spec.ebpf.object, spec.ebpf.prog_type, spec.placement) == (
        "prog.o",
        "xdp",
        "dpu",
    )


def test_an_ebpf_spec_from_a_newer_writer_still_decodes() -> None:
    """EbpfSpec travels inside NodeInvoke and etcd records: a field added later must not break
    an older reader (the manifest, not the Struct, refuses unknown keys)."""
    newer = msgspec.msgpack.encode({"object": "prog.o", "prog_type": "xdp", "attach": "later"})
    assert msgspec.msgpack.decode(newer, type=EbpfSpec) == EbpfSpec(object="prog.o", prog_type="xdp")


def test_offered_program_types_are_the_literal_type() -> None:
    assert set(PROG_TYPES) == set(typing.get_args(ProgType))
