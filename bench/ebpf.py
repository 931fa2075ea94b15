"""eBPF functions: what verification, signing and the node's checks cost, and DPU invocations end
to end, each beside its raw baseline measured in the same run.

1. verify-and-sign latency by program size (straight-line programs of 10 ... 4 000 instructions):
   the service's static checks + the kernel verifier in its strict worker + signing, against a
   bare BPF_PROG_LOAD of the same instructions;
2. a DPU node's check-and-load of a 1 000-instruction program (signature, attestation, digest,
   its own maps, strict-mode load, verified_insns), against a bare BPF_PROG_LOAD;
3. DPU invocations through the scheduler, sequential and 64 in flight, against raw nats-py
   request-reply with the same payload (a 64-byte packet).

    .venv/bin/python -m bench.ebpf [--parts verify,load,invoke] [--tracing on|off]   (as root)
"""

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from bench.warm_invoke import measure, median_round, paired_ratio, ratio_cell, raw_round, start_raw_responder
from cli.client import Client
from deploy import launcher
from ebpf_runtime.admission import LoadRequest, admit
from ebpf_runtime.loader import load
from fabric import bpf, signing
from schemas.ebpf import VerifyReply, program_digest
from tests.bpf_build import COUNTER, bpf_builder
from verifier_service import bytecode, policy
from verifier_service.attestation import load_or_create_key
from verifier_service.kernel import KernelPool
from verifier_service.kernel_worker import KernelRequest
from verifier_service.service import Verifier
from verifier_service.settings import VerifierSettings

SIZES = (10, 100, 1000, 4000)
verifier_pool = KernelPool(1)  # as the service keeps one: workers started ahead of need
REPEAT = 20
XDP = 6


def straight_line(count: int) -> bytes:
    """r0 = 0; r0 += 1 (count - 2 times); exit: every instruction walked once."""
    insns = [bytecode.Insn(0xB7, 0, 0, 0, 0)] + [bytecode.Insn(0x07, 0, 0, 0, 1)] * (count - 2)
    return bytecode.encode([*insns, bytecode.Insn(0x95, 0, 0, 0, 0)])


async def verify_and_sign(raw: bytes, verifier: Verifier) -> VerifyReply:
    """The service's path for one program, minus reading the ELF (constant in program size)."""
    insns = bytecode.decode(raw)
    assert not bytecode.structure(raw, 4096)
    assert not policy.check(
        policy.Program(insns=insns, prog_type="xdp", maps=[], map_refs={}), policy.Limits()
    )
    request = KernelRequest(
        raw=raw, prog_type="xdp", maps=[], map_refs={}, license="GPL", name="bench", samples=[bytes(64)]
    )
    kernel = await verifier_pool.verify(request, 10.0)
    assert kernel.accepted, kernel.error
    reply = VerifyReply(
        accepted=True,
        digest=program_digest(raw, [], {}),
        reasons=[],
        prog_type="xdp",
        insns=len(insns),
        verified_insns=kernel.verified_insns,
        instructions=raw,
    )
    return verifier.attest(reply, "bench", "fn")


def raw_load(raw: bytes) -> float:
    started = time.perf_counter()
    fd, _ = bpf.prog_load(XDP, raw, "GPL", "bench", 0)
    elapsed = time.perf_counter() - started
    os.close(fd)
    return elapsed


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


async def part_verify(verifier: Verifier) -> list[str]:
    lines = [
        "| instructions | verify-and-sign p50 ms | raw BPF_PROG_LOAD p50 ms | ratio |",
        "|---|---|---|---|",
    ]
    for size in SIZES:
        raw = straight_line(size)
        await verify_and_sign(raw, verifier)  # warm-up
        service, baseline = [], []
        for _ in range(REPEAT):
            started = time.perf_counter()
            await verify_and_sign(raw, verifier)
            service.append(time.perf_counter() - started)
            baseline.append(raw_load(raw))
        a, b = median_ms(service), median_ms(baseline)
        lines.append(f"| {size} | {a} | {b} | {a / b:.0f}x |")
    return lines


async def part_node_load(verifier: Verifier, key) -> list[str]:
    """The node's load (its maps, relocation, the strict-mode load, reading verified_insns back)
    against the signature and attestation checks before it: uncached, and as a node does them
    (signatures verified when the program was deployed, so a load finds them verified)."""
    reply = await verify_and_sign(straight_line(1000), verifier)
    assert reply.signed is not None, reply.reasons
    request = LoadRequest(
        tenant="bench",
        function="fn",
        prog_type="xdp",
        maps=[],
        map_refs={},
        instructions=reply.instructions,
        signed=reply.signed,
    )
    trusted = {signing.key_id(key.public_key()): key.public_key()}
    cache = signing.VerifiedSignatures()
    approved = admit(request, trusted, set(), time.time(), cache)
    loads, cold_checks, checks, raw = [], [], [], []
    for _ in range(REPEAT * 5):
        started = time.perf_counter()
        admit(request, trusted, set(), time.time())
        cold_checks.append(time.perf_counter() - started)
        started = time.perf_counter()
        admit(request, trusted, set(), time.time(), cache)
        checks.append(time.perf_counter() - started)
        started = time.perf_counter()
        load(request, approved).close()
        loads.append(time.perf_counter() - started)
        raw.append(_strict_raw_load(reply.instructions))
    node_load = median_ms(loads)
    rows = [
        ("raw BPF_PROG_LOAD (strict mode)", median_ms(raw), ""),
        ("node load: maps, relocation, strict load, verified_insns read back", node_load, ""),
        ("checks, signature verified at deploy time (as nodes run)", median_ms(checks), ""),
        ("checks, signature verified on the spot", median_ms(cold_checks), ""),
    ]
    lines = ["| 1 000-instruction program | p50 ms | added to the node's load |", "|---|---|---|"]
    for name, ms, _ in rows:
        added = f"{ms / node_load:.1%}" if name.startswith("checks") else "-"
        lines.append(f"| {name} | {ms} | {added} |")
    return lines


def _strict_raw_load(raw: bytes) -> float:
    started = time.perf_counter()
    fd, _ = bpf.strict_loader.submit(bpf.prog_load, XDP, raw, "GPL", "bench", 0).result()
    elapsed = time.perf_counter() - started
    os.close(fd)
    return elapsed


def dpu_cluster(work: Path, tracing: bool) -> launcher.ClusterInfo:
    """A scheduler, a verifier and one DPU node (no hosts)."""
    traced = {"tracing": tracing}
    return launcher.up(
        work / "state", hosts=0, verifiers=1, dpus=1, scheduler_overrides=traced, dpu_overrides=traced
    )


async def deploy_counter(client: Client, work: Path) -> None:
    """The packet counter (XDP_PASS and a map update per packet), verified, signed and deployed."""
    fn = work / "counter"
    fn.mkdir()
    (fn / "prog.o").write_bytes(bpf_builder(fn)("counter", COUNTER))
    (fn / "function.toml").write_text(
        'name = "counter"\ntenant = "bench"\nruntime = "ebpf"\n[ebpf]\nobject = "prog.o"\n'
    )
    await client.wait_until_ready(1, timeout_s=30)
    await client.deploy(fn)


def counter_call(client: Client, packet: bytes, run_ns: list[int]) -> Callable[[], Awaitable[None]]:
    """One DPU invocation of the counter; the kernel's own measure of its run goes to `run_ns`."""

    async def call() -> None:
        outcome = await client.invoke("bench", "counter", packet, timeout_ms=10_000)
        reply = outcome.reply
        assert reply is not None and reply.retval == 2, outcome.error
        run_ns.append(reply.run_ns or 0)

    return call


async def part_invoke(work: Path, requests: int, repeat: int, tracing: bool) -> list[str]:
    info = dpu_cluster(work, tracing)
    responder = start_raw_responder(info)  # set-up before anything is measured
    try:
        assert responder.stdout is not None and responder.stdout.readline().strip() == b"ready"
        client = await Client.connect(info.nats_url, "bench-ebpf", creds=info.nats_creds)
        await deploy_counter(client, work)
        packet = bytes(64)
        run_ns: list[int] = []  # the kernel's own measure of each run, as the DPU node reports it
        call = counter_call(client, packet, run_ns)

        lines = [
            "ratio: the median of the rounds' ratios (each DPU round against the raw round just before "
            "it), with their range; req/s and latencies from the median round of each",
            "",
            "| mode | raw req/s | DPU invoke req/s | ratio | raw p50 / p99 µs | DPU p50 / p99 µs |",
            "|---|---|---|---|---|---|",
        ]
        for mode, in_flight in (("sequential", 1), ("in_flight_64", 64)):
            raw_cells, e2e_cells = [], []
            for _ in range(repeat):
                raw_cells.append(await raw_round(info, packet, requests, in_flight))
                await measure(call, 300, in_flight)
                e2e_cells.append(await measure(call, requests, in_flight))
            raw, e2e = median_round(raw_cells), median_round(e2e_cells)
            ratio = ratio_cell(paired_ratio(raw_cells, e2e_cells))
            lines.append(
                f"| {mode} | {raw['req_per_s']} | {e2e['req_per_s']} | {ratio} "
                f"| {raw['p50_us']} / {raw['p99_us']} | {e2e['p50_us']} / {e2e['p99_us']} |"
            )
        await client.close()
        alone = test_run_alone(packet, requests)
        lines += [
            "",
            "| the program's run alone | calls/s | p50 µs |",
            "|---|---|---|",
            f"| `BPF_PROG_TEST_RUN` from Python, one call after another (a 10-instruction XDP program, "
            f"the same packet) | {alone['req_per_s']} | {alone['p50_us']} |",
            f"| inside a DPU invocation, as the kernel measured it (`run_ns`) | - | "
            f"{statistics.median(run_ns) / 1000:.2f} |",
        ]
        return lines
    finally:
        responder.terminate()
        responder.wait()
        launcher.stop(info)


def test_run_alone(packet: bytes, calls: int) -> dict:
    """The raw baseline of a DPU invocation's run: BPF_PROG_TEST_RUN on a loaded program."""
    fd, _ = bpf.strict_loader.submit(bpf.prog_load, XDP, straight_line(10), "GPL", "bench", 0).result()
    try:
        latencies = []
        started = time.perf_counter()
        for _ in range(calls):
            before = time.perf_counter()
            bpf.test_run(fd, packet)
            latencies.append(time.perf_counter() - before)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    return {"req_per_s": round(calls / elapsed), "p50_us": round(statistics.median(latencies) * 1e6, 1)}


async def main(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SystemExit("loading eBPF programs needs root")
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-ebpf-") as tmp:
        work = Path(tmp)
        key = load_or_create_key(work / "signing.pem")
        await verifier_pool.start()
        verifier = Verifier(VerifierSettings(verifier_id="bench", nats_url="", key_path=""), key)
        parts = {
            "verify": lambda: part_verify(verifier),
            "load": lambda: part_node_load(verifier, key),
            "invoke": lambda: part_invoke(work, args.requests, args.repeat, args.tracing == "on"),
        }
        for name in args.parts.split(","):
            print("\n".join(await parts[name]()) + "\n", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="verify,load,invoke", help="which of verify, load, invoke to run")
    parser.add_argument(
        "--requests",
        type=int,
        default=20_000,
        help="per round of DPU invocations (rounds of 3000, ~0.1 s of raw at 64 in flight, gave "
        "pair ratios from 26%% to 57%% for the same code)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="rounds of each (raw, DPU) per mode")
    parser.add_argument(
        "--tracing", choices=("on", "off"), default="off", help="the scheduler's and DPU node's tracing"
    )
    uvloop.run(main(parser.parse_args()))
