"""The CLI's output conventions (cli/output.py): YAML for plain data, errors as one object under
-o json|yaml, and the exit status of each outcome."""

import json

import click
import pytest
from click.testing import CliRunner

from cli.output import EXIT_CODES, CommandError, output_option, to_yaml


@click.command()
@click.argument("code")
@output_option
def failing(code: str, fmt: str) -> None:
    raise CommandError(code, f"it went {code}", detail="more")


@pytest.mark.parametrize(
    ("code", "status"),
    [("not_found", 3), ("unauthorized", 4), ("throttled", 5), ("timeout", 6), ("unavailable", 7),
     ("bad_request", 8), ("internal", 9), ("function_error", 1), ("something_new", 1)],
)  # fmt: skip
def test_each_outcome_has_its_exit_status(code: str, status: int) -> None:
    text = CliRunner().invoke(failing, [code])
    as_json = CliRunner().invoke(failing, [code, "-o", "json"])

    assert text.exit_code == status and f"error: {code}: it went {code}" in text.stderr
    assert as_json.exit_code == status
    assert json.loads(as_json.stdout) == {
        "error": {"code": code, "message": f"it went {code}", "detail": "more"}
    }


def test_the_documented_exit_statuses_are_distinct() -> None:
    named = {code: status for code, status in EXIT_CODES.items() if status != 1}
    assert len(set(named.values())) == len(named) and 2 not in named.values(), "2 is click's usage error"


def test_yaml_of_plain_data() -> None:
    data = {
        "name": "hello",
        "version": "0.1.0",
        "ok": True,
        "none": None,
        "answer": "yes",
        "text": 'say "hi"\nbye',
        "empty": [],
        "nodes": [{"id": "host-1", "idle": 2}, {"id": "host-2", "idle": 0}],
        "nested": {"deep": [1, [2, 3]]},
    }
    assert to_yaml(data) == (
        "name: hello\n"
        'version: "0.1.0"\n'
        "ok: true\n"
        "none: null\n"
        'answer: "yes"\n'
        'text: "say \\"hi\\"\\nbye"\n'
        "empty: []\n"
        "nodes:\n"
        "  - id: host-1\n"
        "    idle: 2\n"
        "  - id: host-2\n"
        "    idle: 0\n"
        "nested:\n"
        "  deep:\n"
        "    - 1\n"
        "    - - 2\n"
        "      - 3\n"
    )


def test_every_command_that_answers_takes_o() -> None:
    from cli.main import cli

    def commands(group: click.Group, path: str) -> list[tuple[str, click.Command]]:
        found = []
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                found += commands(command, f"{path} {name}")
            else:
                found.append((f"{path} {name}".strip(), command))
        return found

    exempt = {"machine run", "completion", "_await"}  # a foreground daemon, a script, the waiter
    missing = [
        name
        for name, command in commands(cli, "")
        if name not in exempt and not {"output", "as_json"} <= {p.name for p in command.params}
    ]
    assert not missing, f"commands without -o/--json: {missing}"
