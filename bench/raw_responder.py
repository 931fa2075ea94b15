"""Baseline peer: a bare nats-py responder echoing every request (its own process, uvloop)."""

import asyncio
import sys

import nats
import uvloop


async def main(url: str, subject: str, creds: str) -> None:
    nc = await nats.connect(url, user_credentials=creds or None)

    async def echo(msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
