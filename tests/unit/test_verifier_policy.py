"""The policy's tables: every helper named as the running kernel names it, and every helper a
program type offers is one of the reviewed ones."""

from pathlib import Path

import pytest

from verifier_service.btf import KIND_ENUM, Btf
from verifier_service.helper_ids import HELPER_NAMES
from verifier_service.policy import ALLOWED_HELPERS, WHY_DENIED

VMLINUX = Path("/sys/kernel/btf/vmlinux")


def kernel_helpers() -> dict[int, str]:
    if not VMLINUX.exists():
        pytest.skip("this kernel has no BTF (/sys/kernel/btf/vmlinux): CONFIG_DEBUG_INFO_BTF is off")
    btf = Btf(VMLINUX.read_bytes())
    enum = next(
        i for i, (kind, *_) in enumerate(btf.types) if kind == KIND_ENUM and btf.names[i] == "bpf_func_id"
    )
    entries = btf._entries(enum, "<Ii")
    return {
        value: "bpf_" + btf.string(name).removeprefix("BPF_FUNC_")
        for name, value in entries
        if value and not btf.string(name).startswith("__")
    }


def test_every_helper_is_named_as_the_running_kernel_names_it() -> None:
    kernel = kernel_helpers()
    differing = {i: (HELPER_NAMES.get(i), name) for i, name in kernel.items() if HELPER_NAMES.get(i) != name}
    assert differing == {}, "regenerate verifier_service/helper_ids.py from this kernel's BTF"


def test_no_helper_is_both_offered_and_denied() -> None:
    for prog_type, allowed in ALLOWED_HELPERS.items():
        assert allowed <= HELPER_NAMES.keys(), prog_type
        assert not allowed & WHY_DENIED.keys(), (prog_type, allowed & WHY_DENIED.keys())
