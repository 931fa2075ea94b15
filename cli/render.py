"""How the CLI shows things to people (tables) and to programs (JSON-able dicts)."""

import base64
import time
from pathlib import Path

import msgspec

from cli.client import InvokeOutcome
from deploy.probe import RoleHealth
from schemas.ebpf import MapDump, VerifyReply
from schemas.messages import ClusterStatus, DescribeReply, FunctionRecord


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def machines_table(machines: list[RoleHealth]) -> str:
    rows = [[m.machine, m.address, m.role, m.health if m.ok else m.health.upper()] for m in machines]
    down = sum(not m.ok for m in machines)
    summary = f"{len({m.machine for m in machines})} machines, {len(machines)} roles" + (
        f", {down} NOT READY" if down else ", all ready"
    )
    return table(["MACHINE", "ADDRESS", "ROLE", "HEALTH"], rows) + "\n" + summary


def status_table(status: ClusterStatus, state_dir: Path, processes: dict[str, bool]) -> str:
    rows = [
        [
            n.node_id,
            n.kind,
            ("healthy" if n.healthy else "UNHEALTHY") + (",SchedulingDisabled" if n.cordoned else ""),
            f"{n.inflight}/{n.capacity}",
            str(n.instances),
            str(n.warm_idle),
            f"{n.stem_cells}/{n.templates}" if n.kind == "host" else "-",
            "-" if n.heartbeat_age_ms is None else f"{n.heartbeat_age_ms / 1000:.1f}s ago",
            n.sandbox_mode or "-",
            n.version or "-",
        ]
        for n in status.nodes
    ]
    schedulers = [f"{s.scheduler_id} ({s.version or '?'})" for s in status.schedulers]
    parts = [
        f"state directory: {state_dir}",
        f"schedulers: {', '.join(schedulers) or '-'} "
        f"(this view from {status.answered_by}); functions: {status.functions}",
        "",
        table(
            [
                "NODE",
                "KIND",
                "HEALTH",
                "INFLIGHT",
                "INSTANCES",
                "WARM-IDLE",
                "STEMS/TEMPLATES",
                "HEARTBEAT",
                "SANDBOX",
                "VERSION",
            ],
            rows,
        )
        if rows
        else "no nodes registered",
    ]
    if replicas := replica_table(status):
        parts += ["", replicas]
    if pools := pool_table(status):
        parts += ["", pools]
    if processes:
        down = [name for name, alive in processes.items() if not alive]
        parts.append(
            f"\nlocal processes: {len(processes) - len(down)}/{len(processes)} running"
            + (f" (not running: {', '.join(down)})" if down else "")
        )
    return "\n".join(parts)


def replica_table(status: ClusterStatus) -> str:
    """Each scheduler replica as the answering one last heard it: its load, its queue, and how
    old its view of the cluster may be (the oldest node heartbeat, or how long etcd is gone)."""
    rows = [
        [
            r.scheduler_id + (" *" if r.scheduler_id == status.answered_by else ""),
            str(r.running),
            str(r.queued),
            str(r.throttled),
            f"{r.view_age_ms / 1000:.1f}s",
            ("live" if r.etcd_ok else "LOST") + (" FENCED" if r.fenced else ""),
            str(r.nodes_healthy),
        ]
        for r in status.replicas
    ]
    if not rows:
        return ""
    return table(["REPLICA", "RUNNING", "QUEUED", "THROTTLED", "VIEW-AGE", "ETCD", "NODES"], rows)


def pool_table(status: ClusterStatus) -> str:
    """Per-shard sandbox pools: what is ready, in use, being recycled, and the refill history."""
    rows = [
        [
            n.node_id,
            str(s.shard),
            s.mode,
            str(s.free),
            (f"{s.prewarmed}" + (f" (+{s.building})" if s.building else "")) if s.mode == "prewarm" else "-",
            str(s.busy),
            str(s.recycling),
            "refilling" if s.refilling else "idle",
            f"{s.created}/{s.recycled}/{s.inline}/{s.vanished}",
        ]
        for n in status.nodes
        for s in n.pool
    ]
    if not rows:
        return ""
    headers = ["NODE", "SHARD", "MODE", "FREE", "PREWARMED", "BUSY", "RECYCLING", "REFILL"]
    return table([*headers, "CREATED/RECYCLED/INLINE/VANISHED"], rows)


def functions_table(records: list[FunctionRecord], wide: bool = False) -> str:
    """One row per function; `wide` (-o wide) adds its concurrency, placement, layer and when it
    was deployed."""
    if not records:
        return "no functions deployed"
    header = ["TENANT", "NAME", "RUNTIME", "HANDLER/COMMAND", "MEMORY", "TIMEOUT", "BUNDLE"]
    if wide:
        header += ["CONCURRENCY", "PLACEMENT", "LAYER", "DEPLOYED"]
    rows = []
    for r in records:
        row = [
            r.spec.tenant,
            r.spec.name,
            r.spec.runtime,
            r.spec.handler or " ".join(r.spec.command or []),
            f"{r.spec.memory_mb}MB",
            f"{r.spec.timeout_ms}ms",
            r.bundle_digest[:19],
        ]
        if wide:
            deployed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.deployed_at))
            row += [str(r.spec.concurrency), r.spec.placement, r.layer_digest[:19] or "-", deployed]
        rows.append(row)
    return table(header, rows)


def description(reply: DescribeReply, now: float) -> str:
    """`hetfaas describe`, as kubectl describe reads: the function, then where it is warm, then
    its recent invocations, newest first."""
    record, spec = reply.function, reply.function.spec
    fields = [
        ("Name", f"{spec.tenant}/{spec.name}"),
        ("Runtime", spec.runtime),
        ("Handler", spec.handler or " ".join(spec.command or []) or "-"),
        ("Memory", f"{spec.memory_mb}MB"),
        ("Timeout", f"{spec.timeout_ms}ms"),
        ("Concurrency", str(spec.concurrency)),
        ("Placement", spec.placement),
        ("Revision", str(reply.revision or "-")),
        ("Bundle", f"{record.bundle_digest} ({record.bundle_size} bytes)"),
        ("Deployed", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.deployed_at))),
    ]
    if record.layer_digest:
        fields.append(("Layer", record.layer_digest))
    if record.program_digest:
        fields.append(("Program", record.program_digest))
    lines = [f"{key + ':':<13}{value}" for key, value in fields]
    warm = ", ".join(f"{node} ({idle} idle)" for node, idle in sorted(reply.warm.items())) or "nowhere"
    lines += [f"{'Warm on:':<13}{warm}", "", "Recent invocations:"]
    rows = [
        [
            r.invocation_id,
            r.node,
            f"{max(0.0, now - r.at):.0f}s ago",
            "cold" if r.cold_start else "warm" if r.duration_ms is not None else "-",
            f"{r.duration_ms:.1f}ms" if r.duration_ms is not None else "-",
            f"{r.error}: {r.message}" if r.error else "ok",
        ]
        for r in reply.recent
    ]
    lines.append(
        table(["ID", "NODE", "WHEN", "START", "DURATION", "OUTCOME"], rows) if rows else "  none yet"
    )
    errors = sum(1 for r in reply.recent if r.error)
    lines.append(f"\n{errors} error(s) in the last {len(reply.recent)} invocation(s)")
    if reply.unanswered:
        lines.append(f"(no answer from {', '.join(reply.unanswered)}: their invocations are not shown)")
    return "\n".join(lines)


def invoke_json(outcome: InvokeOutcome) -> dict:
    reply = outcome.reply
    result: dict = {
        "ok": outcome.ok,
        "invocation_id": outcome.invocation_id,
        "node": outcome.node or None,
        "cold_start": reply.cold_start if reply else None,
        "start_path": (reply.start_path or None) if reply else None,
        "duration_ms": reply.duration_ms if reply else None,
        "latency_ms": round(outcome.latency_ms, 3),
        "phases_ms": reply.phases_ms if reply else {},
        "attempts": reply.attempts if reply else None,
        "output": None,
        "error": None,
    }
    if reply is not None and reply.retval is not None:  # an eBPF function: the packet and verdict
        result |= {"retval": reply.retval, "action": reply.action or None, "run_ns": reply.run_ns}
    if reply is not None:
        try:
            result["output"] = reply.output.decode()
        except UnicodeDecodeError:
            result["output"] = base64.b64encode(reply.output).decode()
            result["output_encoding"] = "base64"
    if outcome.error is not None:
        result["error"] = {"code": outcome.error.code, "message": outcome.error.message}
        if outcome.error.detail:
            result["error"]["detail"] = outcome.error.detail
    return result


def invoke_summary(outcome: InvokeOutcome) -> str:
    if outcome.reply is None:
        return (
            f"[{outcome.invocation_id[:8]}] failed on {outcome.node or '-'} after {outcome.latency_ms:.1f} ms"
        )
    kind = "cold" if outcome.reply.cold_start else "warm"
    if outcome.reply.start_path:
        kind += f" ({outcome.reply.start_path.replace('_', ' ')})"
    if outcome.reply.retval is not None:
        kind += f" retval={outcome.reply.retval}" + (
            f" ({outcome.reply.action})" if outcome.reply.action else ""
        )
    return (
        f"[{outcome.invocation_id[:8]}] node={outcome.node} {kind} latency={outcome.latency_ms:.1f}ms "
        f"node_time={outcome.reply.duration_ms:.1f}ms"
    )


XDP_ACTIONS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}


def verdict(reply: VerifyReply, what: str) -> str:
    """A verification's result as a developer wants it: the verdict, then each reason with the
    instruction it concerns, then the tail of the kernel verifier's log when the kernel refused."""
    if reply.accepted:
        returns = ", ".join(
            XDP_ACTIONS.get(r, str(r)) if reply.prog_type == "xdp" else str(r) for r in reply.sample_retvals
        )
        lines = [
            f"accepted: {what} ({reply.program}, {reply.prog_type}, {reply.insns} instructions)",
            f"  digest {reply.digest}",
            f"  kernel verifier walked {reply.verified_insns} instructions in {reply.mode} mode; "
            f"{reply.run_ns} ns per run",
            f"  maps: {', '.join(m.name for m in reply.maps) or 'none'}",
            f"  on a zeroed 64-byte packet it returned {returns}",
        ]
        return "\n".join(lines)
    lines = [f"rejected: {what}" + (f" ({reply.program})" if reply.program else "")]
    for reason in reply.reasons:
        where = f" at instruction {reason.insn}" if reason.insn is not None else ""
        lines.append(f"  {reason.code}{where}: {reason.message}")
        if reason.source:
            lines.append(f"    {reason.source}")
    if reply.kernel_log_tail and any(r.code == "kernel_verifier" for r in reply.reasons):
        lines.append("  the kernel verifier's log ends:")
        lines += [f"    {line}" for line in reply.kernel_log_tail.splitlines()]
    return "\n".join(lines)


def _number(raw: bytes) -> str:
    """Keys and values of 4 or 8 bytes read as little-endian numbers (counters, ports), else hex."""
    return str(int.from_bytes(raw, "little")) if len(raw) in (4, 8) else raw.hex()


def map_json(dump: MapDump) -> dict:
    return {
        "node": dump.node,
        "name": dump.name,
        "spec": msgspec.to_builtins(dump.spec),
        "entries": [{"key": e.key.hex(), "value": e.value.hex()} for e in dump.entries],
        "truncated": dump.truncated,
    }


def maps_table(dumps: list[MapDump]) -> str:
    rows = [[d.node, d.name, _number(e.key), _number(e.value)] for d in dumps for e in d.entries]
    empty = [[d.node, d.name, "-", "(empty)"] for d in dumps if not d.entries]
    return table(["NODE", "MAP", "KEY", "VALUE"], rows + empty)


def cold_start_table(rows: list[dict]) -> str:
    """Cold starts by pool mode, start path and phase (phases nest: sandbox.* and runtime.init are parts of
    node.cold_start, so shares add up per level, not overall)."""
    return table(
        ["POOL MODE", "START PATH", "PHASE", "COUNT", "P50 MS", "P99 MS", "SHARE"],
        [
            [
                r["pool_mode"],
                r["start_path"],
                r["phase"],
                str(r["count"]),
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['share']:.0%}",
            ]
            for r in rows
        ],
    )


def tenants_table(rows: list[dict]) -> str:
    if not rows:
        return "no tenants (create one: hetfaas tenant create NAME --out NAME.creds)"
    body = [
        [
            r["tenant"],
            str(r["credentials"]),
            str(r["active"]) if r["active"] else "revoked",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])),
        ]
        for r in rows
    ]
    return table(["TENANT", "CREDENTIALS", "ACTIVE", "CREATED"], body)
