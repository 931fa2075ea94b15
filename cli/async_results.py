"""`hetfaas invoke --async`: the invocation is sent and waited for by a process of its own, detached
from the terminal, which writes its result where `hetfaas result ID` reads it:
`<state>/async/<id>.json` (the request, then the result) and `<id>.payload` until it is answered.

Nothing is lost if that process dies (the machine restarts, someone kills it): `result` finds the
request still pending with its waiter gone and starts another, which sends the invocation again
with the same id. Nodes run each id at most once and answer a copy with the first's result
(docs/architecture.md §5), so the second waiter gets the answer of the first run.
At most MAX_KEPT results are kept, the oldest removed first, and none older than KEEP_S."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MAX_KEPT = 1000
KEEP_S = 24 * 3600.0


def directory(state: Path) -> Path:
    path = state / "async"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _write(path: Path, record: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)  # a reader never sees half a record


def read(state: Path, invocation_id: str) -> dict[str, Any] | None:
    if not invocation_id or "/" in invocation_id or invocation_id.startswith("."):
        return None
    try:
        return json.loads((directory(state) / f"{invocation_id}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def submit(state: Path, request: dict[str, Any], payload: bytes, env: dict[str, str]) -> None:
    """Record the request and start its waiter."""
    where = directory(state)
    prune(where, time.time())
    (where / f"{request['invocation_id']}.payload").write_bytes(payload)
    record = {"status": "pending", "request": request, "env": env}
    _write(where / f"{request['invocation_id']}.json", record)
    start_waiter(state, request["invocation_id"], env)


def start_waiter(state: Path, invocation_id: str, env: dict[str, str]) -> None:
    where = directory(state)
    with open(where / f"{invocation_id}.log", "ab") as log:
        waiter = subprocess.Popen(
            [sys.executable, "-m", "cli", "_await", invocation_id],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, **env},
            start_new_session=True,  # not killed with the terminal that asked
        )
    record = read(state, invocation_id) or {}
    _write(where / f"{invocation_id}.json", record | {"waiter": waiter.pid})


def waiter_alive(record: dict[str, Any]) -> bool:
    pid = record.get("waiter")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"_await" in cmdline


def finish(state: Path, invocation_id: str, result: dict[str, Any]) -> None:
    where = directory(state)
    record = read(state, invocation_id) or {}
    _write(where / f"{invocation_id}.json", {**record, "status": "done", "result": result})
    (where / f"{invocation_id}.payload").unlink(missing_ok=True)


def payload(state: Path, invocation_id: str) -> bytes:
    return (directory(state) / f"{invocation_id}.payload").read_bytes()


def prune(where: Path, now: float) -> None:
    """Keep the newest MAX_KEPT - 1 requests (room for one more), none older than KEEP_S."""
    records = sorted(where.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for index, path in enumerate(records):
        if index >= MAX_KEPT - 1 or now - path.stat().st_mtime > KEEP_S:
            for suffix in (".json", ".payload", ".log"):
                path.with_suffix(suffix).unlink(missing_ok=True)
