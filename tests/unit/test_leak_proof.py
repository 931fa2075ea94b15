"""The proof's pure parts: reading the kernel's level-2 state lines, and the reviewed table of
what each allowed helper takes, checked against libbpf's prototypes (bpf_helper_defs.h)."""

import re
from pathlib import Path

import pytest

from verifier_service.bytecode import Insn
from verifier_service.leak_proof import HELPER_ARGS, kind, prove
from verifier_service.policy import ALLOWED_HELPERS
from verifier_service.pruning import PruneWatch
from verifier_service.stack_state import WRITTEN, Frame, misc_bytes, stack_bytes
from verifier_service.verifier_log import split_state

HELPER_DEFS = Path("/usr/include/bpf/bpf_helper_defs.h")
_PROTOTYPE = re.compile(r"static [^;]*?\(\*\s*(?:const\s+)?(\w+)\)\((.*?)\) = \(void \*\) (\d+);", re.S)


def test_every_allowed_helper_has_its_arguments_reviewed() -> None:
    allowed = set().union(*ALLOWED_HELPERS.values())
    assert allowed <= set(HELPER_ARGS), sorted(allowed - set(HELPER_ARGS))


def test_the_table_matches_libbpfs_prototypes() -> None:
    if not HELPER_DEFS.exists():
        pytest.skip("libbpf-dev is not installed (deploy/setup.sh installs it)")
    prototypes = {int(m[3]): m[2] for m in _PROTOTYPE.finditer(HELPER_DEFS.read_text())}
    for helper, args in HELPER_ARGS.items():
        params = [] if prototypes[helper].strip() == "void" else prototypes[helper].split(",")
        assert len(params) == len(args), (helper, params, args)
        for param, arg in zip(params, args, strict=True):
            # a number where C takes a number, a pointer where C takes one: never a pointer passed
            # where the helper would read its value as a number
            assert ("*" in param) == (arg != "n"), (helper, param, arg)


def test_state_lines_are_split_as_the_kernel_prints_them() -> None:
    frame, regs, stack = split_state(
        "frame1: R1=pkt(id=1,off=14,r=0,smin=smin32=0,var_off=(0x0; 0x3c)) R2_w=fp-8 R10=fp0 "
        "fp-8=0000???? fp-16=ctx()"
    )
    assert frame == 1 and regs[2] == "fp-8" and regs[1].endswith("(0x0; 0x3c))")
    assert stack == {-8: "0000????", -16: "ctx()"}
    assert [kind(regs[r]) for r in (1, 2, 10)] == ["pkt", "fp", "fp"]
    assert [kind(v) for v in ("P1", "0x100000000", "-1", "scalar(umax=7)", "Pscalar()")] == ["scalar"] * 5
    assert kind("map_value_or_null(id=2,ks=4,vs=8)") == "map_value_or_null"


def test_a_log_it_cannot_follow_fails_closed() -> None:
    exit_insn = Insn(0x95, 0, 0, 0, 0)
    [reason] = prove("0: R1=ctx() R10=fp0\n0: (95) exit\n", [exit_insn])  # no "processed" line
    assert reason.code == "unproven"
    [reason] = prove("0: (95) exit\nprocessed 1 insns (limit 1000000)\n", [exit_insn])  # R0 not shown
    assert reason.code == "pointer_leak" and "returns a pointer (unknown)" in reason.message


def test_stack_slots_are_read_byte_by_byte() -> None:
    stack = {-8: "mmmmscalar()", -16: "0000????", -24: "ctx()", -32: "P0"}
    found = stack_bytes(stack)
    assert [found.get(a) for a in (-1, -4, -5, -8)] == [WRITTEN] * 4, "mmmm high, a 32-bit number low"
    assert [found.get(a) for a in (-9, -12, -13, -16)] == [WRITTEN, WRITTEN, None, None]
    assert {found[a] for a in range(-24, -16)} == {"ctx"} and found[-32] == WRITTEN
    assert misc_bytes(stack) == {-1, -2, -3, -4}


def test_a_pruned_path_is_checked_against_every_frame_of_the_walked_one() -> None:
    """The caller's fp-16 was MISC when the callee was first walked at 7 (a callee wrote it), and
    unwritten at every call: a path pruned at 7 may hide it."""
    watch, caller, callee = PruneWatch(), Frame(), Frame()
    watch.call(0, caller)  # fp-16 never written by the caller
    watch.callee_wrote(0, -16, -8)
    watch.visit(7, 1, callee)
    assert watch.pruned_here(7, 1, callee) == set(range(-16, -8))
    assert watch.popped(3, 7) is None, "a branch never walked: not followed"
    watch.visit(3, 1, callee)
    assert watch.popped(3, 7) == set(range(-16, -8))
    assert watch.pruned_here(9, 1, callee) is None, "pruned where nothing was walked: not followed"
