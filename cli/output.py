"""How every command prints: `-o text|json|yaml|wide` (`--json` the same as `-o json`), and its
errors, which under `-o json` or `-o yaml` are one object on stdout like any other answer, and
always end the command with an exit status that names the outcome (EXIT_CODES)."""

import functools
import json
import re
import sys
from collections.abc import Callable
from typing import IO, Any, TypeVar

import click

FORMATS = ("text", "json", "yaml", "wide")
# The exit status of each outcome, as scripts tell them apart (README, "Exit codes"). Click itself
# exits 2 on a usage error.
EXIT_CODES = {
    "function_error": 1,  # the function ran and failed; a program rejected; anything not below
    "rejected": 1,
    "not_found": 3,
    "unauthorized": 4,
    "throttled": 5,
    "timeout": 6,
    "unavailable": 7,
    "bad_request": 8,
    "internal": 9,
}
Format = str
F = TypeVar("F", bound=Callable[..., Any])
_chosen: list[Format] = ["text"]  # the running command's format, for its errors


def current() -> Format:
    return _chosen[0]


def structured() -> bool:
    return _chosen[0] in ("json", "yaml")


def output_option(command: F) -> F:
    """Adds -o/--output and --json; the command gets `fmt`, the format chosen."""

    @click.option(
        "-o",
        "--output",
        "output",
        type=click.Choice(FORMATS),
        default=None,
        help="text (the default), json, yaml, or wide (a table with more columns)",
    )
    @click.option("--json", "as_json", is_flag=True, help="the same as -o json")
    @functools.wraps(command)
    def wrapper(*args: Any, output: str | None, as_json: bool, **kwargs: Any) -> Any:
        if as_json and output not in (None, "json"):
            raise click.UsageError(f"--json and -o {output} disagree: give one")
        _chosen[0] = "json" if as_json else output or "text"
        return command(*args, fmt=_chosen[0], **kwargs)

    return wrapper  # type: ignore[return-value]


def emit(obj: Any, out: Format | None = None) -> None:
    """One answer, as JSON or YAML (plain data: dicts, lists, strings, numbers, booleans, None)."""
    if (out or current()) == "yaml":
        click.echo(to_yaml(obj), nl=False)
    else:
        click.echo(json.dumps(obj, indent=2, default=str))


class CommandError(click.ClickException):
    """A command's failure with its error code: its exit status is the code's (EXIT_CODES), and
    under -o json or yaml it is printed as {"error": {"code", "message"}} on stdout."""

    def __init__(self, code: str, message: str, detail: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.text, self.detail = code, message, detail
        self.exit_code = EXIT_CODES.get(code, 1)  # type: ignore[misc]  # click's class attribute, per error

    def show(self, file: IO[Any] | None = None) -> None:
        if structured():
            error = {"code": self.code, "message": self.text} | (
                {"detail": self.detail} if self.detail else {}
            )
            emit({"error": error})
            return
        click.echo(f"error: {self.code}: {self.text}", err=True)
        if self.detail:
            click.echo(self.detail.rstrip(), err=True)


def fail(code: str, message: str, detail: str | None = None) -> None:
    """End the command with this error (printed as the format says), and its exit status."""
    raise CommandError(code, message, detail)


def exit_for(code: str) -> None:
    """An outcome already printed in full (under -o json, the answer itself holds the error)."""
    sys.exit(EXIT_CODES.get(code, 1))


# --- YAML, written for plain data: block style, strings quoted unless they are plainly text ---

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./@:+-]*$")
# Words YAML 1.1 readers take for booleans or null: always quoted.
_AMBIGUOUS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _AMBIGUOUS and not text.endswith(":"):
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar, escapes and all


def to_yaml(obj: Any, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(obj, dict):
        if not obj:
            return pad + "{}\n"
        lines = []
        for key, value in obj.items():
            head = f"{pad}{_scalar(str(key))}:"
            if isinstance(value, dict | list) and value:
                lines.append(head + "\n" + to_yaml(value, indent + 1))
            else:
                lines.append(f"{head} {_inline(value)}\n")
        return "".join(lines)
    if isinstance(obj, list | tuple):
        if not obj:
            return pad + "[]\n"
        lines = []
        for item in obj:
            if isinstance(item, dict | list) and item:
                nested = to_yaml(item, indent + 1)
                lines.append(f"{pad}- {nested.lstrip()}")
            else:
                lines.append(f"{pad}- {_inline(item)}\n")
        return "".join(lines)
    return pad + _inline(obj) + "\n"


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list | tuple):
        return "[]"
    return _scalar(value)
