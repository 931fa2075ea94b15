"""Settings files: TOML decoded straight into a service's frozen settings Struct.

Unknown keys are errors (each settings Struct sets `forbid_unknown_fields=True`), so a typo in a
config file stops the service with a message instead of being silently ignored.
"""

from pathlib import Path
from typing import TypeVar

import msgspec
import tomli_w

T = TypeVar("T")


class SettingsError(ValueError):
    pass


def load_settings(settings_type: type[T], path: str | Path) -> T:
    try:
        return msgspec.toml.decode(Path(path).read_bytes(), type=settings_type)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SettingsError(f"{path}: {exc}") from None


def write_settings(settings: msgspec.Struct, path: str | Path) -> None:
    data = {k: v for k, v in msgspec.to_builtins(settings).items() if v is not None}
    Path(path).write_text(tomli_w.dumps(data))
