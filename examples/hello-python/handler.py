"""Greets whoever the payload names; returns a JSON-able dict, which hetfaas sends as JSON."""

import os
import time

STARTED = time.time()  # module-level work runs once per instance: the cold start


def handle(payload: bytes) -> dict:
    name = payload.decode().strip() or "world"
    age_s = round(time.time() - STARTED, 3)
    return {"greeting": f"hello, {name}!", "instance_pid": os.getpid(), "instance_age_s": age_s}
