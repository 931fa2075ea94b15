"""The verifier on the programs tenants write (tests/ebpf_corpus.py), on the real kernel, as root:

- acceptance by idiom in each mode, and every leak refused in each, with the reason;
- verify time per mode (median of --repeat, the whole pipeline: static checks, a worker's kernel
  walk, the proof in proven mode);
- a node's load-time checks per mode: admission (the signature, the digest) and the load (maps,
  the kernel's walk again in the attested mode, verified_insns compared);
- fairness: a light program's verify time alone and while two other tenants each keep a
  verification bomb (a loop the kernel would walk to its 1M-instruction limit) in flight, for the
  old configuration (2 workers, no CPU budget, the 5 s deadline) and the new (4 workers, 1 s of
  CPU strict and 4 s proven), alternating old and new --pairs times.

    sudo .venv/bin/python -m bench.verifier [--repeat 5] [--pairs 3] [--light variable_header]
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from ebpf_runtime.admission import LoadRequest, admit
from ebpf_runtime.loader import load
from fabric import signing
from tests import ebpf_corpus as corpus
from tests.bpf_build import bpf_builder
from tests.integration.test_kernel_verifier import UNBOUNDED_LOOP
from verifier_service.admission import FairTurns
from verifier_service.attestation import load_or_create_key
from verifier_service.kernel import KernelPool
from verifier_service.pipeline import VerifyLimits, verify
from verifier_service.service import Verifier
from verifier_service.settings import VerifierSettings

MODES = ("strict", "proven", "auto")


def acceptance(build, repeat: int) -> list[str]:
    rows = [
        "| idiom | strict | proven | auto | verify ms strict / proven | walked (strict / proven) |",
        "|---|---|---|---|---|---|",
    ]
    for case in corpus.ACCEPTED:
        data = build(case.name, case.source)
        cells, times, walked = [], [], []
        for mode in MODES:
            replies, spent = _timed(data, case.program, case.prog_type, mode, repeat)
            reply = replies[-1]
            cells.append("accepted" if reply.accepted else f"refused ({reply.reasons[0].code})")
            if mode != "auto":
                times.append(f"{spent:.1f}")
                walked.append(str(reply.verified_insns) if reply.accepted else "-")
            else:
                cells[-1] += f", {reply.mode}" if reply.accepted else ""
        rows.append(f"| {case.idiom} | {' | '.join(cells)} | {' / '.join(times)} | {' / '.join(walked)} |")
    rows += ["", "| leak | strict | proven | auto |", "|---|---|---|---|"]
    for leak in corpus.LEAKS:
        data = build(leak.name, leak.source, leak.flags)
        cells = []
        for mode in MODES:
            reply = asyncio.run(verify(data, None, "xdp", VerifyLimits(), mode=mode))
            cells.append("ACCEPTED" if reply.accepted else f"refused ({reply.reasons[0].code})")
        rows.append(f"| {leak.idiom} | {' | '.join(cells)} |")
    return rows


def _timed(data: bytes, program: str | None, prog_type: str, mode: str, repeat: int):
    async def run():
        pool = KernelPool(1)
        await pool.start()
        replies, times = [], []
        try:
            for _ in range(repeat):
                started = time.perf_counter()
                replies.append(await verify(data, program, prog_type, VerifyLimits(), kernel=pool, mode=mode))
                times.append((time.perf_counter() - started) * 1000)
        finally:
            await pool.close()
        return replies, statistics.median(times)

    return asyncio.run(run())


def load_checks(build, key, repeat: int) -> list[str]:
    settings = VerifierSettings(verifier_id="bench", nats_url="", key_path="")
    keyring = {signing.key_id(key.public_key()): key.public_key()}
    rows = [
        "| idiom | mode | admission µs | load ms (maps, kernel walk, verified_insns) |",
        "|---|---|---|---|",
    ]
    for case in corpus.ACCEPTED:
        data = build(case.name, case.source)
        for mode in ("strict", "proven"):
            reply = asyncio.run(verify(data, case.program, case.prog_type, VerifyLimits(), mode=mode))
            if not reply.accepted:
                continue
            signed = Verifier(settings, key).attest(reply, "bench", "fn")
            assert signed.signed is not None
            request = LoadRequest(
                tenant="bench", function="fn", prog_type=reply.prog_type, maps=signed.maps,  # type: ignore[arg-type]
                map_refs=signed.map_refs, instructions=signed.instructions, signed=signed.signed,
            )  # fmt: skip
            admitted, loaded = [], []
            for _ in range(repeat):
                started = time.perf_counter()
                approved = admit(request, keyring, set(), time.time())
                middle = time.perf_counter()
                load(request, approved).close()
                admitted.append((middle - started) * 1e6)
                loaded.append((time.perf_counter() - middle) * 1000)
            admit_us, load_ms = statistics.median(admitted), statistics.median(loaded)
            rows.append(f"| {case.idiom} | {mode} | {admit_us:.0f} | {load_ms:.2f} |")
    return rows


async def _light_times(light: bytes, limits: VerifyLimits, workers: int, heavy: bytes | None, n: int):
    """The light tenant's verify times (ms), with two heavy tenants each keeping a bomb in flight."""
    pool, turns = KernelPool(workers), FairTurns(workers)
    await pool.start()
    stop = asyncio.Event()

    async def heavy_tenant(name: str) -> None:
        while not stop.is_set():
            await turns.run(name, lambda: verify(heavy, None, "xdp", limits, kernel=pool))

    flooders = [asyncio.create_task(heavy_tenant(f"heavy-{i}")) for i in range(2)] if heavy else []
    try:
        if flooders:
            await asyncio.sleep(0.3)  # both bombs in the kernel before the first light request
        times = []
        for _ in range(n):
            started = time.perf_counter()
            reply = await turns.run("light", lambda: verify(light, None, "xdp", limits, kernel=pool))
            assert reply.accepted, reply.reasons
            times.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.05)
        return times
    finally:
        stop.set()
        for task in flooders:
            task.cancel()
        await asyncio.gather(*flooders, return_exceptions=True)
        await pool.close()


CONFIGS = {
    "old (2 workers, no CPU budget)": (
        2,
        VerifyLimits(kernel_cpu_budget_s=1e9, proven_cpu_budget_s=1e9, kernel_timeout_s=5.0),
    ),
    "new (4 workers, CPU budgets)": (4, VerifyLimits()),
}


def fairness(build, light_name: str, pairs: int, n: int) -> list[str]:
    case = next(c for c in corpus.ACCEPTED if c.name == light_name)
    light, bomb = build(case.name, case.source), build("bomb", UNBOUNDED_LOOP)
    rows = [
        "| pair | configuration | light alone p50 ms | with 2 heavy tenants p50 / max ms | ratio p50 / max |",
        "|---|---|---|---|---|",
    ]
    for pair in range(1, pairs + 1):
        for label, (workers, limits) in CONFIGS.items():
            alone = asyncio.run(_light_times(light, limits, workers, None, n))
            burst = asyncio.run(_light_times(light, limits, workers, bomb, n))
            base = statistics.median(alone)
            rows.append(
                f"| {pair} | {label} | {base:.1f} | {statistics.median(burst):.1f} / {max(burst):.1f} | "
                f"{statistics.median(burst) / base:.2f} / {max(burst) / base:.2f} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--light-calls", type=int, default=10)
    parser.add_argument(
        "--light", default="variable_header", help="the light tenant's program (a corpus name)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["acceptance", "load", "fairness"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-") as tmp:
        build = bpf_builder(Path(tmp))
        key = load_or_create_key(Path(tmp) / "signing.pem")
        if "acceptance" not in args.skip:
            print("\n".join(acceptance(build, args.repeat)), "\n", flush=True)
        if "load" not in args.skip:
            print("\n".join(load_checks(build, key, args.repeat)), "\n", flush=True)
        if "fairness" not in args.skip:
            print("\n".join(fairness(build, args.light, args.pairs, args.light_calls)))


if __name__ == "__main__":
    main()
