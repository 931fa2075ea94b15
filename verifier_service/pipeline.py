"""The whole verification of one tenant program: static checks and policy (static.py), then the
kernel verifier in its worker (kernel.py) with the instruction budget, then the verdict."""

import re

import msgspec

from schemas.ebpf import Reason, VerifyReply
from verifier_service.bytecode import CALL, CALL_HELPER, decode
from verifier_service.elf import ObjectError, read_object
from verifier_service.kernel import KernelPool, run_kernel_verifier
from verifier_service.kernel_worker import KernelRequest
from verifier_service.policy import Limits
from verifier_service.static import check_object

LOG_INSN = re.compile(r"^(\d+): \(", re.MULTILINE)
DEFAULT_SAMPLE = bytes(64)  # a zeroed 64-byte frame


class VerifyLimits(msgspec.Struct, frozen=True, kw_only=True):
    static: Limits = Limits()
    max_verified_insns: int = 100_000  # far below the kernel's 1M: the budget of docs/architecture.md §5
    kernel_timeout_s: float = 5.0


async def verify(
    data: bytes,
    program: str | None,
    prog_type: str,
    limits: VerifyLimits,
    samples: list[bytes] | None = None,
    kernel: KernelPool | None = None,
) -> VerifyReply:
    """The verdict, unsigned (signing is the service's)."""
    static = check_object(data, program, prog_type, limits.static)
    refused = VerifyReply(
        accepted=False,
        digest=static.digest,
        reasons=static.reasons,
        program=static.program,
        prog_type=prog_type,
        insns=static.insns,
        maps=static.maps,
        map_refs=static.map_refs,
    )
    if not static.accepted:
        return refused
    try:
        obj = read_object(data, program)
    except ObjectError as exc:  # accepted statically, so this cannot happen; stay safe anyway
        return msgspec.structs.replace(refused, reasons=[exc.reason])
    request = KernelRequest(
        raw=obj.raw,
        prog_type=prog_type,
        maps=obj.maps,
        map_refs=obj.map_refs,
        license=obj.license or "GPL",
        name=obj.name,
        samples=samples or [DEFAULT_SAMPLE],
    )
    if kernel is not None:
        result = await kernel.verify(request, limits.kernel_timeout_s)
    else:
        result = await run_kernel_verifier(request, limits.kernel_timeout_s)
    reasons = []
    if not result.accepted:
        reasons.append(_kernel_reason(result.error, result.log_tail))
    elif result.verified_insns > limits.max_verified_insns:
        budget = limits.max_verified_insns
        message = f"the verifier walked {result.verified_insns} instructions, over the budget of {budget}"
        reasons.append(Reason("verified_insn_budget", message))
    return msgspec.structs.replace(
        refused,
        accepted=not reasons,
        reasons=reasons,
        verified_insns=result.verified_insns,
        run_ns=result.run_ns,
        helpers=helpers_called(obj.raw),
        sample_retvals=[run.retval for run in result.runs],
        kernel_log_tail=result.log_tail,
        instructions=obj.raw if not reasons else b"",
    )


def helpers_called(raw: bytes) -> list[int]:
    return sorted({i.imm for i in decode(raw) if i.code == CALL and i.src == CALL_HELPER})


def _kernel_reason(error: str, log_tail: str) -> Reason:
    """The kernel's refusal as a developer reads it: its last log line, at the instruction it names."""
    lines = [line for line in log_tail.splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if not line.startswith("processed ")), error)
    positions = LOG_INSN.findall(log_tail)
    return Reason(
        "kernel_verifier",
        f"the kernel verifier refused it: {last}",
        int(positions[-1]) if positions else None,
    )
