"""eBPF functions end to end: deploy (verified and signed on the way), the scheduler places them on
a DPU node, which loads the approved program on first use and runs each payload through it."""

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cli.client import Client, ClientError, ProgramRejected
from deploy import build_ebpf, launcher
from dpu_node.settings import DpuNodeSettings
from schemas import codec, subjects
from schemas.ebpf import MapWrite
from schemas.messages import Heartbeat, instance_key
from tests import ebpf_corpus as corpus
from tests.bpf_build import COUNTER, bpf_builder
from tests.integration.conftest import EXAMPLES

pytestmark = [pytest.mark.integration, pytest.mark.privileged]

TC_DROP_UDP = """
#include <linux/pkt_cls.h>
SEC("tc")
int drop_udp(struct __sk_buff *skb)
{
    __u8 protocol = 0;
    if (bpf_skb_load_bytes(skb, 23, &protocol, 1) < 0)  /* IPv4 header's protocol byte */
        return TC_ACT_OK;
    return protocol == 17 ? TC_ACT_SHOT : TC_ACT_OK;
}
"""
KEEP_HEADERS = """
SEC("socket")
int keep_headers(struct __sk_buff *skb) { return 42; }  /* keep the first 42 bytes */
"""
PEEK = """
SEC("xdp")
int peek(struct xdp_md *ctx) { unsigned char *data = (void *)(long)ctx->data; return data[20]; }
"""


@pytest.fixture(scope="module")
def dpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.ClusterInfo]:
    if os.geteuid() != 0:
        pytest.skip("verifiers and DPU nodes load eBPF programs: they need root")
    info = launcher.up(tmp_path_factory.mktemp("dpu") / "state", hosts=0, verifiers=1, dpus=1)
    try:
        yield info
    finally:
        launcher.stop(info)


@pytest.fixture(scope="module")
async def dclient(dpu_cluster: launcher.ClusterInfo) -> AsyncIterator[Client]:
    client = await Client.connect(dpu_cluster.nats_url, "dpu-tests", creds=dpu_cluster.nats_creds)
    await client.wait_until_ready(1, timeout_s=30)
    yield client
    await client.close()


def ebpf_function(root: Path, name: str, source: str, tenant: str = "acme", prog_type: str = "xdp") -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "prog.o").write_bytes(bpf_builder(directory)(name, source))
    manifest = f'name = "{name}"\ntenant = "{tenant}"\nruntime = "ebpf"\n'
    (directory / "function.toml").write_text(
        manifest + f'\n[ebpf]\nobject = "prog.o"\nprog_type = "{prog_type}"\n'
    )
    return directory


async def wait_for_runs(client: Client, tenant: str, runs: int):
    """The DPU node's status once its heartbeat has counted `runs` runs for `tenant`."""
    deadline = time.monotonic() + 10
    while True:
        [dpu] = [n for n in (await client.status()).nodes if n.kind == "dpu"]
        if dpu.tenant_runs.get(tenant, 0) >= runs or time.monotonic() > deadline:
            return dpu
        await asyncio.sleep(0.1)  # heartbeats come once a second


def udp_packet(port: int) -> bytes:
    ethernet = b"\xaa" * 6 + b"\xbb" * 6 + b"\x08\x00"  # destination, source, IPv4
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]) + bytes(8)
    udp = (1234).to_bytes(2, "big") + port.to_bytes(2, "big") + (8).to_bytes(2, "big") + b"\0\0"
    return ethernet + ip + udp + bytes(22)


async def test_an_ebpf_function_runs_on_the_dpu(dclient: Client, tmp_path: Path) -> None:
    deployed = await dclient.deploy(ebpf_function(tmp_path, "counter", COUNTER))
    first = await dclient.invoke("acme", "counter", bytes(64))
    second = await dclient.invoke("acme", "counter", bytes(64))

    assert deployed.function.program_digest.startswith("sha256-")
    assert first.ok and second.ok, (first.error, second.error)
    assert first.node == "dpu-1" and first.reply.cold_start and "program_load_ms" in first.reply.phases_ms
    assert not second.reply.cold_start
    assert (second.reply.retval, second.reply.action) == (2, "XDP_PASS") and second.reply.output == bytes(64)
    assert second.reply.run_ns is not None


async def test_a_burst_of_first_invocations_waits_for_one_load(dclient: Client, tmp_path: Path) -> None:
    await dclient.deploy(
        ebpf_function(tmp_path, "burst", COUNTER.replace("max_entries, 4)", "max_entries, 6)"))
    )
    outcomes = await asyncio.gather(*(dclient.invoke("acme", "burst", bytes(64)) for _ in range(64)))

    assert [o.error for o in outcomes if not o.ok] == []
    assert sum(o.reply.cold_start for o in outcomes) == 1, "loaded once; the others waited for it"


async def test_a_tenant_reads_its_own_maps_and_only_those(dclient: Client, tmp_path: Path) -> None:
    await dclient.deploy(ebpf_function(tmp_path, "tally", COUNTER))
    for _ in range(5):
        await dclient.invoke("acme", "tally", bytes(64))
    mine = await dclient.maps("acme", "tally")
    await dclient.deploy(ebpf_function(tmp_path / "b", "tally", COUNTER, tenant="bravo"))
    theirs = await dclient.maps("bravo", "tally")  # same name, other tenant: its own, never loaded
    with pytest.raises(ClientError) as unknown:
        await dclient.maps("mallory", "tally")

    [dump] = mine.maps
    counts = {int.from_bytes(e.key, "little"): int.from_bytes(e.value, "little") for e in dump.entries}
    assert dump.name == "counters" and counts[0] == 5
    dpu = await wait_for_runs(dclient, "acme", 5)
    assert dpu.tenant_runs["acme"] >= 5, "the node accounts runs per tenant"
    assert theirs.maps == [], "tenant bravo sees nothing of acme's counter"
    assert unknown.value.error.code == "not_found"


async def test_a_tenant_writes_its_own_maps_on_every_loaded_copy(dclient: Client, tmp_path: Path) -> None:
    source = "const volatile __u32 version = 1;\n" + corpus.LPM.source  # a frozen .rodata beside the trie
    source = source.replace("return bpf_map_lookup_elem", "return version && bpf_map_lookup_elem")
    await dclient.deploy(ebpf_function(tmp_path, "blocklist", source))
    packet = bytearray(64)
    packet[26:30] = bytes([10, 1, 2, 3])  # IPv4 source 10.1.2.3

    before = await dclient.invoke("acme", "blocklist", bytes(packet))
    added = await dclient.maps("acme", "blocklist", MapWrite(map="blocked", key="10.1.0.0/16", value="1"))
    blocked = await dclient.invoke("acme", "blocklist", bytes(packet))
    deleted = await dclient.maps("acme", "blocklist", MapWrite(map="blocked", key="10.1.0.0/16"))
    after = await dclient.invoke("acme", "blocklist", bytes(packet))
    with pytest.raises(ClientError) as frozen:
        await dclient.maps("acme", "blocklist", MapWrite(map=".rodata", key="0", value="0"))
    with pytest.raises(ClientError) as unknown_map:
        await dclient.maps("acme", "blocklist", MapWrite(map="routes", key="1", value="1"))
    with pytest.raises(ClientError) as wrong_size:
        await dclient.maps("acme", "blocklist", MapWrite(map="blocked", key="10.1.0.0/16", value="0x01"))
    with pytest.raises(ClientError) as other_tenant:  # bravo has no such function: never acme's
        await dclient.maps("bravo", "blocklist", MapWrite(map="blocked", key="10.0.0.0/8", value="1"))

    assert [o.reply.action for o in (before, blocked, after)] == ["XDP_PASS", "XDP_DROP", "XDP_PASS"]
    assert added.applied == ["dpu-1"] and deleted.applied == ["dpu-1"]
    [trie] = added.maps
    assert [(e.key, e.value) for e in trie.entries] == [
        ((16).to_bytes(4, "little") + bytes([10, 1, 0, 0]), b"\1\0\0\0")
    ]
    assert frozen.value.error.code == "bad_request" and "frozen" in frozen.value.error.message
    assert "its maps: .rodata, blocked" in unknown_map.value.error.message
    assert "1 bytes; the map's value is 4 bytes" in wrong_size.value.error.message
    assert other_tenant.value.error.code == "not_found"


async def test_the_examples_filter_and_bounce_packets(dclient: Client) -> None:
    clang = shutil.which("clang")
    for name in ("ebpf-port-filter", "ebpf-swap-mac", "ebpf-counter"):
        build_ebpf.build(EXAMPLES / name, clang)  # deploy/setup.sh built them already; cheap if so
        await dclient.deploy(EXAMPLES / name, tenant="examples")
    to_9 = await dclient.invoke("examples", "port-filter", udp_packet(9))
    to_53 = await dclient.invoke("examples", "port-filter", udp_packet(53))
    bounced = await dclient.invoke("examples", "mac-bounce", udp_packet(53))
    counted = [await dclient.invoke("examples", "packet-counter", p) for p in (udp_packet(53), bytes(64))]
    [counters] = (await dclient.maps("examples", "packet-counter")).maps

    assert (to_9.reply.action, to_53.reply.action) == ("XDP_DROP", "XDP_PASS")
    assert bounced.reply.action == "XDP_TX"
    sent = udp_packet(53)
    assert bounced.reply.output == sent[6:12] + sent[0:6] + sent[12:], "source and destination swapped"
    assert all(o.reply.action == "XDP_PASS" for o in counted)
    values = {int.from_bytes(e.key, "little"): int.from_bytes(e.value, "little") for e in counters.entries}
    assert values == {0: 2, 1: 1}, "two packets, one of them IPv4"


async def test_tc_and_socket_filter_programs_run_too(dclient: Client, tmp_path: Path) -> None:
    await dclient.deploy(ebpf_function(tmp_path, "tcdrop", TC_DROP_UDP, prog_type="sched_cls"))
    await dclient.deploy(ebpf_function(tmp_path, "headers", KEEP_HEADERS, prog_type="socket_filter"))
    udp = await dclient.invoke("acme", "tcdrop", udp_packet(53))
    tcp = await dclient.invoke("acme", "tcdrop", udp_packet(53)[:23] + b"\x06" + udp_packet(53)[24:])
    kept = await dclient.invoke("acme", "headers", udp_packet(53))

    assert (udp.reply.action, tcp.reply.action) == ("TC_ACT_SHOT", "TC_ACT_OK"), (udp, tcp)
    assert kept.ok and kept.reply.retval == 42


async def test_a_revoked_program_is_unloaded_and_refused(dclient: Client, tmp_path: Path) -> None:
    deployed = await dclient.deploy(
        ebpf_function(tmp_path, "doomed", COUNTER.replace("max_entries, 4)", "max_entries, 5)"))
    )
    before = await dclient.invoke("acme", "doomed", bytes(64))
    await dclient.revoke(deployed.function.program_digest, "a verifier CVE")

    async def refused() -> bool:
        outcome = await dclient.invoke("acme", "doomed", bytes(64))
        return outcome.error is not None and "revoked" in outcome.error.message

    deadline = time.monotonic() + 10
    while not await refused():
        assert time.monotonic() < deadline, "the DPU node kept running a revoked program"
        await asyncio.sleep(0.05)  # the revocation travels through etcd's watch

    assert before.ok


async def test_a_removed_function_s_program_leaves_the_dpu(dclient: Client, tmp_path: Path) -> None:
    """Its approval is withdrawn with it: the DPU node unloads the program (and its maps), so the
    tenant's partition has the room again; deployed anew, it loads afresh."""
    source = COUNTER.replace("max_entries, 4)", "max_entries, 7)")
    deployed = await dclient.deploy(ebpf_function(tmp_path, "fleeting", source))
    loaded_key = instance_key("acme", "fleeting", deployed.function.program_digest)
    beats: asyncio.Queue[Heartbeat] = asyncio.Queue()
    watch = await dclient.nc.subscribe_inline(
        subjects.heartbeat("dpu-1"), lambda _s, _r, data, _h: beats.put_nowait(codec.heartbeat.decode(data))
    )

    async def next_beat_where(loaded: bool) -> None:
        async with asyncio.timeout(10):
            while (loaded_key in (await beats.get()).warm_idle) != loaded:
                pass

    try:
        first = await dclient.invoke("acme", "fleeting", bytes(64))
        await next_beat_where(loaded=True)
        await dclient.remove("acme", "fleeting")
        await next_beat_where(loaded=False)
    finally:
        await watch.unsubscribe()
    await dclient.deploy(ebpf_function(tmp_path / "again", "fleeting", source))
    again = await dclient.invoke("acme", "fleeting", bytes(64))

    assert first.ok and first.reply.cold_start
    assert again.ok and again.reply.cold_start, "loaded afresh: the old program was gone"


async def test_a_rejected_program_is_not_deployed(dclient: Client, tmp_path: Path) -> None:
    with pytest.raises(ProgramRejected) as rejected:
        await dclient.deploy(ebpf_function(tmp_path, "peek", PEEK))
    listed = [f.spec.name for f in await dclient.functions("acme")]

    assert rejected.value.verdict.reasons[0].code == "kernel_verifier"
    assert "peek" not in listed


async def test_a_dpu_takes_far_more_invocations_at_once_than_it_has_cores(dclient: Client) -> None:
    """A program runs for microseconds, an invocation is in flight (on the wire, queued) far
    longer: a DPU that registered its 8 cores as its capacity had the scheduler hold 64
    concurrent calls to 8 at a time, half its throughput."""
    [dpu] = [n for n in (await dclient.status()).nodes if n.kind == "dpu"]
    settings = DpuNodeSettings(node_id="x", nats_url="", etcd_endpoints=[], trusted_keys=["k"])
    assert dpu.capacity == settings.capacity >= 32 * settings.cores


async def test_a_drained_dpu_node_answers_and_is_cordoned(dclient: Client) -> None:
    try:
        drained = await dclient.drain("dpu-1")
        cordoned = {n.node_id: n.cordoned for n in (await dclient.status()).nodes}
    finally:
        undrained = await dclient.drain("dpu-1", drain=False)

    assert drained.cordoned and drained.note == "", drained
    assert cordoned == {"dpu-1": True}
    assert not undrained.cordoned and undrained.note == ""
