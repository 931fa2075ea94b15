"""The example settings files operators copy must load, name every setting, and keep its default."""

import tomllib
from pathlib import Path

import msgspec
import pytest

from dpu_node.settings import DpuNodeSettings
from ebpf_runtime.settings import EbpfRuntimeSettings
from fabric.settings import SettingsError, load_settings
from host_node.settings import HostNodeSettings
from scheduler.settings import SchedulerSettings
from verifier_service.settings import VerifierSettings

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "config"


@pytest.mark.parametrize(
    ("path", "settings_type"),
    [
        ("scheduler.example.toml", SchedulerSettings),
        ("host_node.example.toml", HostNodeSettings),
        ("verifier.example.toml", VerifierSettings),
        ("dpu_node.example.toml", DpuNodeSettings),
    ],
)
def test_example_files_document_every_setting(path: str, settings_type: type) -> None:
    doc = tomllib.loads((CONFIG / path).read_text())
    settings = load_settings(settings_type, CONFIG / path)
    _assert_documented(doc, settings_type, (CONFIG / path).read_text())
    # Optional settings show their defaults, so the file doubles as the reference; state_dir's
    # default (none: no trace files) is the one left out on purpose.
    defaults = {
        f.name: f.default
        for f in msgspec.structs.fields(settings_type)
        if f.default is not msgspec.NODEFAULT and f.name != "state_dir"
    }
    assert {name: getattr(settings, name) for name in defaults} == defaults


def _assert_documented(doc: dict, settings_type: type, text: str = "") -> None:
    """Every field is in the file, and every nested settings Struct as a table, field by field;
    an optional table (default None) may be shown commented out instead."""
    optional = {f.name for f in msgspec.structs.fields(settings_type) if f.default is None}
    commented = {name for name in optional - set(doc) if f"# [{name}]" in text}
    assert set(doc) | commented == set(settings_type.__struct_fields__)
    for field in msgspec.structs.fields(settings_type):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            _assert_documented(doc[field.name], field.type)


def test_unknown_and_mistyped_settings_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('scheduler_id = "s"\nnats_url = "n"\netcd_endpoints = ["e"]\nlease_ttl = 5\n')
    with pytest.raises(SettingsError, match="unknown field `lease_ttl`"):
        load_settings(SchedulerSettings, path)
    path.write_text('scheduler_id = "s"\nnats_url = "n"\netcd_endpoints = "e"\n')
    with pytest.raises(SettingsError, match="Expected `array`"):
        load_settings(SchedulerSettings, path)


def test_the_commented_ebpf_table_of_the_host_example_loads_and_shows_the_defaults() -> None:
    """The optional [ebpf] table is shown commented out; uncommented, it must be valid."""
    text = (CONFIG / "host_node.example.toml").read_text()
    block = text[text.index("# [ebpf]") :]
    table = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    doc = tomllib.loads(text.replace(block, table))
    settings = msgspec.convert(doc, HostNodeSettings)
    assert settings.ebpf is not None
    assert settings.ebpf == EbpfRuntimeSettings(trusted_keys=settings.ebpf.trusted_keys)
