"""The kernel verifier, run in a process of its own that keeps only CAP_BPF, CAP_NET_ADMIN and
CAP_PERFMON permitted (no CAP_SYS_ADMIN), and makes effective per request what the request's mode
needs (fabric/bpf.py): strict, the kernel's unprivileged rules (no pointer leaks, Spectre
mitigations on); proven, a privileged load at log level 2 whose log leak_proof.py checks. It
creates throwaway maps of the declared shapes, points the program's map references at them, loads
it, reads back `verified_insns` and profiles it with BPF_PROG_TEST_RUN. One request on stdin, one
result on stdout (msgpack); the service kills it at its budget (the verifier stops at a pending
signal)."""

import os
import re
import struct
import sys
from typing import BinaryIO

import msgspec

from fabric import bpf
from schemas.ebpf import PROG_TYPES, MapSpec, Reason, VerifyMode
from verifier_service.bytecode import decode
from verifier_service.leak_proof import prove

LOG_TAIL_LINES = 20
PROFILE_REPEAT = 1000
# A level-2 log takes 150-500 bytes per instruction walked (measured: 156 for a parser, 480 for a
# long loop): the budget of 100k instructions fits. A longer walk is refused for it (ENOSPC).
PROOF_LOG_BYTES = 64 << 20
ENOSPC = 28
# A privileged load's log prints map addresses (`r1 = 0xffff888100c9e400`): never shown to tenants.
_KERNEL_ADDRESS = re.compile(r"0xffff[0-9a-f]{12}")


class KernelRequest(msgspec.Struct, frozen=True, kw_only=True):
    raw: bytes
    prog_type: str
    maps: list[MapSpec]
    map_refs: dict[int, str]
    license: str
    name: str
    samples: list[bytes]
    mode: VerifyMode = "strict"


class SampleRun(msgspec.Struct, frozen=True):
    retval: int
    output: bytes


class KernelResult(msgspec.Struct, frozen=True, kw_only=True):
    accepted: bool
    verified_insns: int = 0
    log_tail: str = ""
    error: str = ""
    runs: list[SampleRun] = []
    run_ns: int = 0  # per run, averaged over PROFILE_REPEAT runs of the first sample
    leaks: list[Reason] = []  # proven mode: what the proof found (a load it refuses is not run)
    stopped: str = ""  # set by the pool: "cpu_budget", "timeout" (killed) or "worker_failed"


def verify(request: KernelRequest) -> KernelResult:
    """One verification; every map and program it creates is closed before the next."""
    fds: dict[str, int] = {}
    prog_fd = -1
    try:
        for spec in request.maps:
            fds[spec.name] = bpf.create_map(spec)
        by_value = frozenset(spec.name for spec in request.maps if spec.global_data)
        code = bpf.relocate_maps(request.raw, request.map_refs, fds, by_value)
        proving = request.mode == "proven"
        bpf.switch_mode(request.mode)
        try:
            prog_fd, log = bpf.prog_load(
                PROG_TYPES[request.prog_type],
                code,
                request.license,
                request.name,
                2 if proving else 1,
                PROOF_LOG_BYTES if proving else bpf.LOG_SIZE,
            )
        except bpf.BpfError as exc:
            if proving and exc.errno == ENOSPC:
                return KernelResult(accepted=False, error="the kernel's log of its walk is over 64 MiB")
            return KernelResult(accepted=False, error=str(exc), log_tail=_tail(_level_one(exc.log)))
        finally:
            bpf.switch_mode("strict")
        if proving and (leaks := _proof(log, request.raw)):
            return KernelResult(
                accepted=True, verified_insns=bpf.verified_insns(prog_fd), leaks=leaks, log_tail=_tail(log)
            )
        runs = [SampleRun(*bpf.test_run(prog_fd, sample)[:2]) for sample in request.samples]
        run_ns = bpf.test_run(prog_fd, request.samples[0], PROFILE_REPEAT)[2] if request.samples else 0
        return KernelResult(
            accepted=True,
            verified_insns=bpf.verified_insns(prog_fd),
            log_tail=_tail(log),
            runs=runs,
            run_ns=run_ns,
        )
    except bpf.BpfError as exc:
        return KernelResult(accepted=False, error=str(exc))
    finally:
        for fd in [*fds.values(), *([prog_fd] if prog_fd >= 0 else [])]:
            os.close(fd)


def _proof(log: str, raw: bytes) -> list[Reason]:
    """The proof's reasons; a fault in it refuses the program (fails closed) and keeps the worker."""
    try:
        return prove(log, decode(raw))
    except Exception as exc:  # any fault: refuse, say so
        return [Reason("unproven", f"proven mode could not check it (an error in the proof: {exc!r})")]


def _tail(log: str) -> str:
    return _KERNEL_ADDRESS.sub("0x...", "\n".join(log.strip().splitlines()[-LOG_TAIL_LINES:]))


def _level_one(log: str) -> str:
    """A refused level-2 log, as level 1 would end: the failing path, without its liveness notes."""
    return "\n".join(line for line in log.splitlines() if not line.startswith(("mark_precise", "(", " ")))


FRAME = struct.Struct("<I")  # each request and result: a 4-byte length, then msgpack


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer framed requests until stdin closes. The service kills a worker at its deadline (the
    kernel's verifier stops at a pending signal) and starts another."""
    decoder = msgspec.msgpack.Decoder(KernelRequest)
    while header := stdin.read(FRAME.size):
        (size,) = FRAME.unpack(header)
        result = verify(decoder.decode(stdin.read(size)))
        body = msgspec.msgpack.encode(result)
        stdout.write(FRAME.pack(len(body)) + body)
        stdout.flush()


def main() -> None:
    bpf.keep_modes_permitted()  # this process has one thread: the whole process
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
