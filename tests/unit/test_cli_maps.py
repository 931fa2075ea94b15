"""`hetfaas maps`: NAME alone still shows (as before there were subcommands); set and delete
take what they need, and say what is missing before any connection is made."""

from click.testing import CliRunner

from cli.main import cli


def test_maps_name_alone_shows() -> None:
    result = CliRunner().invoke(cli, ["maps", "packet-counter", "--help"])
    assert result.exit_code == 0 and "Show the maps of an ebpf function" in result.output


def test_set_needs_a_map_and_a_value() -> None:
    result = CliRunner().invoke(cli, ["maps", "set", "blocklist", "--key", "10.0.0.0/8"])
    assert result.exit_code == 2 and "Missing option '--map'" in result.output


def test_delete_needs_a_key() -> None:
    result = CliRunner().invoke(cli, ["maps", "delete", "blocklist", "--map", "blocked"])
    assert result.exit_code == 2 and "Missing option '--key'" in result.output


def test_the_group_says_how_keys_are_written() -> None:
    result = CliRunner().invoke(cli, ["maps", "--help"])
    assert result.exit_code == 0 and "10.1.0.0/16" in result.output
