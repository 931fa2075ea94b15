"""The kernel verifier, run in a process of its own with only CAP_BPF and CAP_NET_ADMIN (no
CAP_SYS_ADMIN, no CAP_PERFMON), so the kernel verifies in its strictest mode: no pointer leaks,
Spectre mitigations on. It creates throwaway maps of the declared shapes, points the program's
map references at them, loads it, reads back `verified_insns` and profiles it with
BPF_PROG_TEST_RUN. One request on stdin, one result on stdout (msgpack); the service kills it at
its deadline (the verifier stops at a pending signal)."""

import os
import struct
import sys
from typing import BinaryIO

import msgspec

from fabric import bpf
from schemas.ebpf import PROG_TYPES, MapSpec

LOG_TAIL_LINES = 20
PROFILE_REPEAT = 1000


class KernelRequest(msgspec.Struct, frozen=True, kw_only=True):
    raw: bytes
    prog_type: str
    maps: list[MapSpec]
    map_refs: dict[int, str]
    license: str
    name: str
    samples: list[bytes]


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


def verify(request: KernelRequest) -> KernelResult:
    """One verification; every map and program it creates is closed before the next."""
    fds: dict[str, int] = {}
    prog_fd = -1
    try:
        for spec in request.maps:
            fds[spec.name] = bpf.create_map(spec)
        by_value = frozenset(spec.name for spec in request.maps if spec.global_data)
        code = bpf.relocate_maps(request.raw, request.map_refs, fds, by_value)
        try:
            prog_fd, log = bpf.prog_load(PROG_TYPES[request.prog_type], code, request.license, request.name)
        except bpf.BpfError as exc:
            return KernelResult(accepted=False, error=str(exc), log_tail=_tail(exc.log))
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


def _tail(log: str) -> str:
    return "\n".join(log.strip().splitlines()[-LOG_TAIL_LINES:])


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
    bpf.keep_only_bpf_capabilities()  # this process has one thread: the whole process
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
