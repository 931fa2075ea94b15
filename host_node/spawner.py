"""How a host node starts function processes. The secure sandbox (cgroup pools, namespaces,
seccomp) replaces `PlainSpawner` behind this same interface."""

import asyncio
import os
import signal
from typing import IO, Protocol


class Spawner(Protocol):
    async def spawn(
        self,
        argv: list[str],
        *,
        cwd: str,
        stdin: int | IO[bytes] | None,
        stdout: int | IO[bytes] | None,
        stderr: int | IO[bytes] | None,
        pass_fds: tuple[int, ...] = (),
    ) -> asyncio.subprocess.Process: ...


class PlainSpawner:
    """Plain child processes, each leading its own process group so a timeout can kill it whole."""

    async def spawn(self, argv, *, cwd, stdin, stdout, stderr, pass_fds=()):
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=pass_fds,
            start_new_session=True,
            env=_function_env(),
        )


def _function_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    return {k: v for k, v in os.environ.items() if k in keep} | {"PYTHONDONTWRITEBYTECODE": "1"}


def kill_group(proc: asyncio.subprocess.Process) -> None:
    """Kill the process and everything it started (its session's process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
