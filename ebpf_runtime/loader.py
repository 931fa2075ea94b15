"""Loading an admitted program on a node: the node creates and owns every map (per tenant,
never shared), points the program at them, lets the kernel verifier run again, and refuses the
program unless the kernel walked exactly as many instructions as the attestation says."""

import os
from dataclasses import dataclass, field

from ebpf_runtime.admission import LoadRequest, Refused
from fabric import bpf
from schemas.ebpf import PROG_TYPES, Attestation, MapSpec, ProgType


@dataclass
class Loaded:
    tenant: str
    function: str
    digest: str
    prog_type: ProgType
    prog_fd: int
    maps: dict[str, tuple[int, MapSpec]] = field(default_factory=dict)  # name -> (fd, spec)

    def run(self, packet: bytes) -> tuple[int, bytes, int]:
        """(return code, output packet, kernel-measured ns) of one run on `packet`."""
        return bpf.test_run(self.prog_fd, packet)

    def close(self) -> None:
        for fd in [self.prog_fd, *(fd for fd, _ in self.maps.values())]:
            os.close(fd)


def load(request: LoadRequest, approved: Attestation) -> Loaded:
    maps: dict[str, tuple[int, MapSpec]] = {}
    try:
        for spec in request.maps:
            maps[spec.name] = (bpf.create_map(spec), spec)
        by_value = frozenset(spec.name for spec in request.maps if spec.global_data)
        fds = {n: fd for n, (fd, _) in maps.items()}
        code = bpf.relocate_maps(request.instructions, request.map_refs, fds, by_value)
        prog_type = PROG_TYPES[request.prog_type]
        # the thread of the attested mode: the kernel verifies as the verifier service's worker did
        loader = bpf.loaders[approved.mode]
        loading = loader.submit(bpf.prog_load, prog_type, code, "GPL", request.function, 0)
        prog_fd, _log = loading.result()
    except (bpf.BpfError, ValueError) as exc:
        _close(maps)
        raise Refused("load_failed", f"the kernel refused to load it here: {exc}") from None
    loaded = Loaded(request.tenant, request.function, approved.digest, request.prog_type, prog_fd, maps)
    walked = bpf.verified_insns(prog_fd)
    if walked != approved.verified_insns:
        loaded.close()
        raise Refused(
            "verified_insns_mismatch",
            f"this kernel walked {walked} instructions, the attestation says {approved.verified_insns}: "
            "a different verifier; the program must be verified again",
        )
    return loaded


def _close(maps: dict[str, tuple[int, MapSpec]]) -> None:
    for fd, _ in maps.values():
        os.close(fd)
