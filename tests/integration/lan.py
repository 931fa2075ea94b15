"""Machines for tests: network namespaces on one switch (a bridge in a namespace of its own), each
machine with its own address, reached from the test process by one more link. Every interface
and namespace is the test's own and is removed afterwards; the host's own are never touched."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def needs_namespaces() -> None:
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed (deploy/setup.sh installs it)")


class Lan:
    """A /24 of machines: `add(name)` gives a machine its namespace and address; the test process
    reaches them all from `gateway`."""

    def __init__(self) -> None:
        tag = os.getpid() % 250
        self.prefix = f"10.233.{tag}"
        self.switch = f"hfsw-{os.getpid()}"
        self.gateway = f"{self.prefix}.254"
        self._links: list[str] = []  # our ends in this namespace (deleted at close)
        self._ports = 0
        self.machines: dict[str, str] = {}  # name -> namespace
        ip("netns", "add", self.switch)
        self._in(self.switch, "link", "add", "br0", "type", "bridge")
        self._in(self.switch, "link", "set", "br0", "up")
        ours = f"hfg{os.getpid()}"
        self._plug(ours, None)
        ip("addr", "add", f"{self.gateway}/24", "dev", ours)
        ip("link", "set", ours, "up")

    def _in(self, namespace: str, *args: str) -> None:
        ip("netns", "exec", namespace, "ip", *args)

    def _plug(self, end: str, namespace: str | None) -> None:
        """A veth from `namespace` (None: ours) to the switch's bridge."""
        self._ports += 1
        port = f"p{self._ports}-{os.getpid()}"[:15]
        ip("link", "add", end, "type", "veth", "peer", "name", port)
        ip("link", "set", port, "netns", self.switch)
        self._in(self.switch, "link", "set", port, "master", "br0")
        self._in(self.switch, "link", "set", port, "up")
        if namespace is not None:
            ip("link", "set", end, "netns", namespace)
        self._links.append(end)

    def add(self, name: str) -> str:
        """Machine `name`: its namespace (hf-<name>-<pid>) and its address on the switch."""
        namespace = f"hf-{name}-{os.getpid()}"
        address = f"{self.prefix}.{len(self.machines) + 1}"
        ip("netns", "add", namespace)
        self.machines[name] = namespace
        end = f"hfm{len(self.machines)}-{os.getpid()}"[:15]  # unique here; eth0 in the machine
        self._plug(end, namespace)
        self._links.pop()  # it lives (and dies) in the machine's namespace
        self._in(namespace, "link", "set", end, "name", "eth0")
        self._in(namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        self._in(namespace, "link", "set", "eth0", "up")
        self._in(namespace, "link", "set", "lo", "up")
        return address

    def enter(self, name: str) -> list[str]:
        """The command prefix that runs a process on machine `name` (nsenter, not `ip netns
        exec`: that one remounts /sys, which hides the host's cgroups)."""
        return ["nsenter", f"--net=/run/netns/{self.machines[name]}"]

    def close(self) -> None:
        for namespace in [*self.machines.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        for end in self._links:  # ours is not in a namespace: gone only when deleted
            subprocess.run(["ip", "link", "del", end], capture_output=True)

    @staticmethod
    def namespace_of(pid: int) -> int:
        return os.stat(f"/proc/{pid}/ns/net").st_ino

    def inode(self, name: str) -> int:
        return Path(f"/run/netns/{self.machines[name]}").stat().st_ino
