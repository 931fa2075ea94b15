"""Where the CPU of a warm invocation goes: µs of CPU per invocation in each process of the path.

Runs N warm invocations at a fixed number in flight against a local cluster and reads every
process's CPU time (utime + stime from /proc/<pid>/stat) before and after; the client's own
from getrusage. Beside it the same for raw nats-py request-reply against the echo responder,
the baseline `bench.warm_invoke` and `bench.ebpf` compare with. `--path host` invokes a python
echo function on host nodes; `--path dpu` the eBPF packet counter on a DPU node (as root).
`--sandbox` sets the host nodes' sandbox mode (default: their own, `prewarm`; `plain` runs the
instances as bare child processes): what the sandbox costs a warm invocation.

    .venv/bin/python -m bench.cpu_split [--path host|dpu] [--requests 20000] [--in-flight 64] [--tracing off]
        [--sandbox plain|naive|pool|prewarm]
"""

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import uvloop

from bench.ebpf import counter_call, deploy_counter, dpu_cluster
from bench.warm_invoke import e2e_round, measure, prepare, raw_round, round_arguments, start_raw_responder
from cli.client import Client
from deploy import launcher
from fabric import telemetry
from host_node.sandbox.settings import MODES, SandboxSettings

TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")

# Which part of the path a process is, by its command line (first match wins).
ROLES = (
    ("python_worker", "python instance"),
    ("raw_responder", "echo responder"),
    ("scheduler", "scheduler"),
    ("host_node", "host node"),
    ("dpu_node", "dpu node"),
    ("nats-server", "nats-server"),
    ("etcd", "etcd"),
)


def role_of(cmdline: bytes, roles: tuple[tuple[str, str], ...] = ROLES) -> str | None:
    text = cmdline.decode(errors="replace")
    return next((role for needle, role in roles if needle in text), None)


def cpu_by_role(roles: tuple[tuple[str, str], ...] = ROLES) -> dict[str, float]:
    """CPU µs so far of every process whose command line names a role (the machine's others ignored)."""
    totals: dict[str, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            role = role_of(Path(entry.path, "cmdline").read_bytes(), roles)
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if role is not None:
            totals[role] = totals.get(role, 0.0) + (int(fields[11]) + int(fields[12])) * TICK_US
    return totals


def own_cpu_us() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1e6


def measured(round_of, requests: int) -> dict[str, float]:
    before, client_before = cpu_by_role(), own_cpu_us()
    started = time.perf_counter()
    rate = uvloop.run(round_of())["req_per_s"]
    elapsed = time.perf_counter() - started
    after, client_after = cpu_by_role(), own_cpu_us()
    split = {role: (after[role] - before.get(role, 0.0)) / requests for role in after}
    split["client"] = (client_after - client_before) / requests
    return {role: us for role, us in split.items() if us > 0.5} | {"_req_per_s": rate, "_s": elapsed}


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    payload = os.urandom(args.payload)
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-") as tmp:
        work = Path(tmp)
        tracing = args.tracing == "on"
        info = start_cluster(work, args, tracing)
        responder = start_raw_responder(info)
        try:
            assert responder.stdout is not None and responder.stdout.readline().strip() == b"ready"
            n, k = args.requests, args.in_flight
            if args.path == "dpu":
                uvloop.run(prepare_dpu(info, work))
                e2e = lambda: dpu_round(info, n, k)  # noqa: E731
            else:
                uvloop.run(prepare(info, work, args.concurrency, args.hosts))
                e2e = lambda: e2e_round(info, payload, n, k)  # noqa: E731
            raw = measured(lambda: raw_round(info, payload, n, k), n)
            if tracing:  # the client traces too, as `hetfaas invoke` does
                telemetry.setup_tracing("bench-client", info.state_dir, True)
            try:
                return {"raw": raw, "e2e": measured(e2e, n)}
            finally:
                telemetry.stop_tracing()
        finally:
            responder.terminate()
            responder.wait()
            launcher.stop(info)


def start_cluster(work: Path, args: argparse.Namespace, tracing: bool) -> launcher.ClusterInfo:
    if args.path == "dpu":
        return dpu_cluster(work, tracing)
    return launcher.up(
        work / "state",
        hosts=args.hosts,
        scheduler_overrides={"tracing": tracing},
        host_overrides=host_settings(tracing, args.sandbox),
    )


def host_settings(tracing: bool, sandbox_mode: str | None) -> dict[str, object]:
    """The host nodes' settings that differ from a local cluster's."""
    if not sandbox_mode:
        return {"tracing": tracing}
    # under a cgroup parent of its own, as every local cluster's sandboxes are
    sandbox = SandboxSettings(mode=sandbox_mode, cgroup_parent="hetfaas-bench-cpu-split")
    return {"tracing": tracing, "sandbox": sandbox}


async def prepare_dpu(info: launcher.ClusterInfo, work: Path) -> None:
    client = await Client.connect(info.nats_url, "bench-setup", creds=info.nats_creds)
    try:
        await deploy_counter(client, work)
    finally:
        await client.close()


async def dpu_round(info: launcher.ClusterInfo, requests: int, in_flight: int) -> dict:
    client = await Client.connect(info.nats_url, "bench", creds=info.nats_creds)
    try:
        call = counter_call(client, bytes(64), [])
        await measure(call, 300, in_flight)  # warm-up: the program loaded
        return await measure(call, requests, in_flight)
    finally:
        await client.close()


def report(split: dict[str, dict[str, float]]) -> str:
    roles = sorted({r for s in split.values() for r in s if not r.startswith("_")})
    lines = ["| process | e2e µs CPU / invocation | raw µs CPU / request |", "|---|---|---|"]
    for role in roles:
        cells = [f"{split[k][role]:.0f}" if role in split[k] else "-" for k in ("e2e", "raw")]
        lines.append(f"| {role} | {cells[0]} | {cells[1]} |")
    totals = [sum(v for r, v in split[k].items() if not r.startswith("_")) for k in ("e2e", "raw")]
    lines.append(f"| **total** | **{totals[0]:.0f}** | **{totals[1]:.0f}** |")
    lines.append(f"| req/s | {split['e2e']['_req_per_s']} | {split['raw']['_req_per_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = round_arguments(__doc__)
    parser.set_defaults(requests=20_000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--tracing", choices=("on", "off"), default="off")
    parser.add_argument("--path", choices=("host", "dpu"), default="host")
    parser.add_argument("--sandbox", choices=MODES, help="the host nodes' sandbox mode")
    print(report(run(parser.parse_args())))


if __name__ == "__main__":
    main()
