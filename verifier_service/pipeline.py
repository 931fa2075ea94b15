"""The whole verification of one tenant program: static checks and policy (static.py), then the
kernel verifier in its worker (kernel.py) with the instruction budget, in the mode asked for (auto:
strict, and proven when strict refuses it), then the verdict."""

import re

import msgspec

from schemas.ebpf import VERIFY_MODES, Reason, VerifyReply
from verifier_service.bytecode import CALL, CALL_HELPER, decode
from verifier_service.kernel import KernelPool, run_kernel_verifier
from verifier_service.kernel_worker import KernelRequest, KernelResult
from verifier_service.policy import Limits
from verifier_service.static import check_object, with_source

LOG_INSN = re.compile(r"^(\d+): \(", re.MULTILINE)
DEFAULT_SAMPLE = bytes(64)  # a zeroed 64-byte frame


class VerifyLimits(msgspec.Struct, frozen=True, kw_only=True):
    static: Limits = Limits()
    max_verified_insns: int = 100_000  # far below the kernel's 1M: the budget of docs/architecture.md §5
    # CPU a walk may spend before it is stopped. Measured here, a straight loop walked to 110 008
    # instructions: strict (log level 1) 0.25 s; proven, the level-2 load 1.1 s and the proof of
    # its 52 MB log 1.5 s (bench/RESULTS.md, "CPU a walk of the budget takes"). The kernel's 1M
    # limit takes 3-5 s strict.
    kernel_cpu_budget_s: float = 1.0  # strict
    proven_cpu_budget_s: float = 4.0  # proven: the load and the proof
    kernel_timeout_s: float = 15.0  # wall clock, however loaded the machine: the last resort
    modes: tuple[str, ...] = VERIFY_MODES  # the modes this verifier offers


async def verify(
    data: bytes,
    program: str | None,
    prog_type: str,
    limits: VerifyLimits,
    samples: list[bytes] | None = None,
    kernel: KernelPool | None = None,
    mode: str = "auto",
) -> VerifyReply:
    """The verdict, unsigned (signing is the service's)."""
    modes = [m for m in limits.modes if mode in ("auto", m)]
    if not modes:
        offered = ", ".join(limits.modes)
        reason = Reason("mode", f"verification mode {mode!r} is not offered here (only {offered})")
        return VerifyReply(accepted=False, digest="", reasons=[reason], prog_type=prog_type)
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
    if not static.accepted or (obj := static.object) is None:
        return refused
    request = KernelRequest(
        raw=obj.raw,
        prog_type=prog_type,
        maps=obj.maps,
        map_refs=obj.map_refs,
        license=obj.license or "GPL",
        name=obj.name,
        samples=samples or [DEFAULT_SAMPLE],
    )
    for attempt in modes:  # strict first: it keeps the kernel's Spectre hardening
        result = await _walk(msgspec.structs.replace(request, mode=attempt), limits, kernel)
        reasons = _reasons(result, limits)
        if not reasons or result.leaks:
            break  # accepted; or the privileged load found what strict refused for: a leak
    return msgspec.structs.replace(
        refused,
        accepted=not reasons,
        reasons=with_source(reasons, obj.lines),
        kernel_types=obj.kernel_types,
        mode=attempt,
        verified_insns=result.verified_insns,
        run_ns=result.run_ns,
        helpers=helpers_called(obj.raw),
        sample_retvals=[run.retval for run in result.runs],
        kernel_log_tail=result.log_tail,
        instructions=obj.raw if not reasons else b"",
    )


async def _walk(request: KernelRequest, limits: VerifyLimits, kernel: KernelPool | None) -> KernelResult:
    budget = limits.proven_cpu_budget_s if request.mode == "proven" else limits.kernel_cpu_budget_s
    if kernel is not None:
        return await kernel.verify(request, limits.kernel_timeout_s, budget)
    return await run_kernel_verifier(request, limits.kernel_timeout_s, budget)


def _reasons(result: KernelResult, limits: VerifyLimits) -> list[Reason]:
    budget = limits.max_verified_insns
    if result.stopped == "worker_failed":
        return [Reason("verifier_failed", result.error)]
    if result.stopped:
        return [
            Reason(
                "verified_insn_budget",
                f"{result.error}: a walk of {budget} instructions, the budget, takes less. Bound its loops "
                "tighter, or split it into fewer branches",
            )
        ]
    if not result.accepted:
        return [_kernel_reason(result.error, result.log_tail)]
    if result.leaks:
        return result.leaks
    if result.verified_insns > budget:
        message = f"the verifier walked {result.verified_insns} instructions, over the budget of {budget}"
        return [Reason("verified_insn_budget", message)]
    return []


def helpers_called(raw: bytes) -> list[int]:
    return sorted({i.imm for i in decode(raw) if i.code == CALL and i.src == CALL_HELPER})


def _kernel_reason(error: str, log_tail: str) -> Reason:
    """The kernel's refusal as a developer reads it: its last log line, at the instruction it names."""
    lines = [line for line in log_tail.splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if not line.startswith("processed ")), error)
    positions = LOG_INSN.findall(log_tail)
    hint = next((hint for pattern, hint in _HINTS if pattern in last), "")
    return Reason(
        "kernel_verifier",
        f"the kernel verifier refused it: {last}" + (f". {hint}" if hint else ""),
        int(positions[-1]) if positions else None,
    )


# What to write instead, for the kernel's commonest refusals (its words, then ours).
_PROVEN = 'proven mode takes it: verify with --mode proven, or verify_mode = "proven" in [ebpf]'
_HINTS = (
    ("pointer -= pointer prohibited", "Strict mode refuses pointer differences; " + _PROVEN),
    (
        "has pointer with unsupported alu operation",
        "Strict mode refuses a packet pointer plus a register; " + _PROVEN,
    ),
    (
        "pointer comparison prohibited",
        "Compare packet pointers with data_end, and other pointers only with NULL",
    ),
    ("leaks addr", "Store, return and pass numbers, not pointers: a pointer's value is the kernel's"),
    (
        "invalid read from stack",
        "Initialize the variable before it is read or passed (= {} or __builtin_memset)",
    ),
    ("invalid access to packet", "Check the access against data_end first: if (p + n > data_end) return ..."),
    ("outside of the packet", "Check the access against data_end first: if (p + n > data_end) return ..."),
    ("unbounded memory access", "Bound the index first (if (i >= N) return ...), or mask it"),
    ("back-edge", "Bound the loop by a constant, or use bpf_loop()"),
    ("too large", "Bound the loop by a constant, or use bpf_loop()"),
    ("invalid mem access 'scalar'", "Check the pointer a map lookup returned against NULL before using it"),
    ("map_value_or_null", "Check the pointer a map lookup returned against NULL before using it"),
)
