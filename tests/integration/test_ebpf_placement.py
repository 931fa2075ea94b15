"""eBPF placement across kinds: DPUs first, a host that loads signed programs (the same runtime
and checks as a DPU node) when no DPU has room and the function allows `placement = "any"`."""

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.client import Client
from deploy import launcher
from tests.bpf_build import COUNTER, bpf_builder
from tests.integration.conftest import HOST_OVERRIDES

pytestmark = [pytest.mark.integration, pytest.mark.privileged]


@pytest.fixture(scope="module")
async def mixed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """One DPU whose tenant partition holds a single program, one host that runs eBPF too."""
    if os.geteuid() != 0:
        pytest.skip("verifiers and eBPF-running nodes load programs into the kernel: they need root")
    info = launcher.up(tmp_path_factory.mktemp("mixed") / "state", hosts=0, verifiers=1, dpus=0)
    client = await Client.connect(info.nats_url, "ebpf-placement-tests", creds=info.nats_creds)
    try:
        launcher.start_dpu(info, 1, {"tenant_programs": 1})
        launcher.start_host(info, 1, {**HOST_OVERRIDES, "ebpf": launcher.host_ebpf(info)})
        await client.wait_until_ready(2, timeout_s=30)
        yield client
    finally:
        await client.close()
        launcher.stop(info)


def counter(root: Path, name: str, placement: str) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "prog.o").write_bytes(bpf_builder(directory)(name, COUNTER))
    (directory / "function.toml").write_text(
        f'name = "{name}"\ntenant = "acme"\nruntime = "ebpf"\nplacement = "{placement}"\n'
        '\n[ebpf]\nobject = "prog.o"\nprog_type = "xdp"\n'
    )
    return directory


async def test_dpu_first_then_an_ebpf_host_when_the_dpu_is_full(mixed: Client, tmp_path: Path) -> None:
    """The three functions share their bytecode: each still has its own approval (an
    attestation names its function), so none is refused for another's."""
    await mixed.deploy(counter(tmp_path, "first", "any"))
    await mixed.deploy(counter(tmp_path, "second", "any"))
    await mixed.deploy(counter(tmp_path, "strict", "dpu"))

    first = await mixed.invoke("acme", "first", bytes(64))
    second = await mixed.invoke("acme", "second", bytes(64))  # the DPU's partition for acme is full
    strict = await mixed.invoke("acme", "strict", bytes(64))  # may not leave the DPUs
    again = [await mixed.invoke("acme", name, bytes(64)) for name in ("first", "second")]

    assert first.ok and first.node == "dpu-1", first.error
    assert second.ok and second.node == "host-1", second.error
    assert (second.reply.retval, second.reply.action) == (2, "XDP_PASS"), "ran in the host's kernel"
    assert strict.error is not None and strict.error.code == "unavailable", strict
    assert [(o.node, o.reply.cold_start) for o in again] == [("dpu-1", False), ("host-1", False)]
    maps = await mixed.maps("acme", "second")
    assert [(d.node, d.name) for d in maps.maps] == [("host-1", "counters")]
