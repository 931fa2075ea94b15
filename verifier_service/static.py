"""The static half of verification, before the kernel's verifier: read the object, check the
instruction stream's structure, apply the isolation policy. Pure: bytes in, a verdict out."""

import msgspec

from schemas.ebpf import MapSpec, Reason, program_digest
from verifier_service import bytecode, policy
from verifier_service.btf_ext import line_of
from verifier_service.elf import ElfProgram, ObjectError, read_object
from verifier_service.policy import Limits, Program


class StaticVerdict(msgspec.Struct, frozen=True, kw_only=True):
    accepted: bool
    reasons: list[Reason]
    digest: str = ""  # of the instructions (map references symbolic) and the map specs
    program: str = ""
    insns: int = 0
    maps: list[MapSpec] = []
    map_refs: dict[int, str] = {}
    object: ElfProgram | None = None  # what was read (the kernel's half loads it): None if unreadable


def check_object(data: bytes, program: str | None, prog_type: str, limits: Limits) -> StaticVerdict:
    try:
        obj = read_object(data, program)
    except ObjectError as exc:
        return StaticVerdict(accepted=False, reasons=[exc.reason])
    reasons = bytecode.structure(obj.raw, limits.max_insns)
    if not reasons:
        insns = bytecode.decode(obj.raw)
        parsed = Program(insns=insns, prog_type=prog_type, maps=obj.maps, map_refs=obj.map_refs)
        reasons = obj.problems + policy.check(parsed, limits)
    return StaticVerdict(
        accepted=not reasons,
        reasons=with_source(reasons, obj.lines),
        digest=program_digest(obj.raw, obj.maps, obj.map_refs),
        program=obj.name,
        insns=len(obj.raw) // bytecode.INSN_SIZE,
        maps=obj.maps,
        map_refs=obj.map_refs,
        object=obj,
    )


def with_source(reasons: list[Reason], lines: dict[int, str]) -> list[Reason]:
    """Each reason at an instruction, with the source line it was compiled from."""
    return [
        msgspec.structs.replace(r, source=line_of(lines, r.insn)) if r.insn is not None and lines else r
        for r in reasons
    ]
