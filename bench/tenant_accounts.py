"""What per-tenant NATS accounts would cost the bus: a tenant's request relayed as hetfaas relays
an invocation (tenant -> "scheduler" -> "node", which answers the reply subject it was given in
the body), with the tenant in the services' account (today) against in an account of its own
that imports the invoke subject as a service (what a per-tenant connection limit needs: NATS
counts connections per account). Both in one run on one nats-server, alternating.

    .venv/bin/python -m bench.tenant_accounts [--requests 5000] [--repeat 3] [--in-flight 64]
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

from deploy import services
from fabric import credentials as c

SUBJECT = "hetfaas.invoke.alice.f"
RELAY = "bench.node"


class Keys:
    def __init__(self) -> None:
        self.operator = c.new_seed("operator")
        self.system = c.new_seed("account")
        self.services, self.services_signing = c.new_seed("account"), c.new_seed("account")
        self.tenant, self.tenant_signing = c.new_seed("account"), c.new_seed("account")

    def config(self, resolver_dir: Path) -> str:
        services_pub, tenant_pub = c.public_key(self.services), c.public_key(self.tenant)
        activation = c.encode_jwt(
            {
                "sub": tenant_pub,
                "name": "invoke",
                "nats": {
                    "type": "activation",
                    "version": 2,
                    "subject": "hetfaas.invoke.alice.*",
                    "kind": "service",
                    "issuer_account": services_pub,
                },
            },
            self.services_signing,
        )
        export = {"name": "invoke", "subject": "hetfaas.invoke.*.*", "type": "service", "token_req": True}
        imported = {
            "name": "invoke",
            "subject": "hetfaas.invoke.alice.*",
            "account": services_pub,
            "token": activation,
            "type": "service",
        }
        accounts = {
            c.public_key(self.system): self._account(self.system, "SYS", None, {}),
            services_pub: self._account(
                self.services, "HETFAAS", self.services_signing, {"exports": [export]}
            ),
            tenant_pub: self._account(self.tenant, "alice", self.tenant_signing, {"imports": [imported]}),
        }
        preload = "".join(f'  {key}: "{jwt}"\n' for key, jwt in accounts.items())
        return (
            f'operator: "{c.operator_jwt(self.operator, "bench", c.public_key(self.system))}"\n'
            f'system_account: "{c.public_key(self.system)}"\n'
            f'resolver: {{ type: full, dir: "{resolver_dir}" }}\n'
            f"resolver_preload: {{\n{preload}}}\n"
        )

    def _account(self, seed: str, name: str, signing: str | None, extra: dict) -> str:
        limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True}
        claims = {
            "type": "account",
            "version": 2,
            "limits": limits | {"conn": -1, "leaf": 0},
            "signing_keys": [c.public_key(signing)] if signing else [],
            "default_permissions": {"pub": {}, "sub": {}},
            **extra,
        }
        return c.encode_jwt({"sub": c.public_key(seed), "name": name, "nats": claims}, self.operator)

    def user(
        self, directory: Path, name: str, in_tenant_account: bool, pub: list[str], sub: list[str]
    ) -> str:
        account, signing = (
            (self.tenant, self.tenant_signing)
            if in_tenant_account
            else (self.services, self.services_signing)
        )
        seed = c.new_seed("user")
        jwt = c.user_jwt(signing, c.public_key(account), c.public_key(seed), name, pub, sub)
        path = directory / f"{name}.creds"
        c.write_secret(path, c.creds_text(jwt, seed))
        return str(path)


async def relay(url: str, scheduler_creds: str, node_creds: str) -> None:
    """The services' side: the "scheduler" passes the reply subject on in the body, as
    NodeInvoke.reply_to does; the "node" answers it."""
    scheduler = await nats.connect(url, user_credentials=scheduler_creds)
    node = await nats.connect(url, user_credentials=node_creds)

    async def forward(msg) -> None:
        await scheduler.publish(RELAY, msg.reply.encode() + b" " + msg.data)

    async def answer(msg) -> None:
        reply, _, data = msg.data.partition(b" ")
        await node.publish(reply.decode(), data)

    await scheduler.subscribe("hetfaas.invoke.>", cb=forward)
    await node.subscribe(RELAY, cb=answer)
    await scheduler.flush()
    await node.flush()
    print("ready", flush=True)
    await asyncio.Future()


async def measure(url: str, creds: str, requests: int, in_flight: int) -> float:
    nc = await nats.connect(url, user_credentials=creds, inbox_prefix="_INBOX.alice")
    try:
        await nc.request(SUBJECT, b"warm-up", timeout=5)
        remaining = requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await nc.request(SUBJECT, b"x" * 64, timeout=10)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return requests / (time.perf_counter() - started)
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--serve", nargs=3, metavar=("URL", "SCHEDULER", "NODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(relay(*args.serve))
        return
    keys = Keys()
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-accounts-") as tmp:
        work = Path(tmp)
        port = services.free_port()
        server = services.start_nats(
            port, work / "data", work / "nats.conf", work / "nats.log", auth_config=keys.config(work / "acc")
        )
        url = f"nats://127.0.0.1:{port}"
        tenant_pub, tenant_sub = [SUBJECT], ["_INBOX.alice.>"]
        creds = {
            "one account": keys.user(work, "alice-same", False, tenant_pub, tenant_sub),
            "own account": keys.user(work, "alice-own", True, tenant_pub, tenant_sub),
        }
        scheduler = keys.user(work, "scheduler", False, [RELAY], ["hetfaas.invoke.>"])
        node = keys.user(work, "node", False, ["_INBOX.>", "_R_.>"], [RELAY])
        responder = subprocess.Popen(
            [sys.executable, "-m", "bench.tenant_accounts", "--serve", url, scheduler, node],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert responder.stdout is not None and responder.stdout.readline().strip() == "ready"
            rates: dict[str, list[float]] = {name: [] for name in creds}
            for _ in range(args.repeat):
                for name, path in creds.items():  # alternating, in one sitting
                    rates[name].append(asyncio.run(measure(url, path, args.requests, args.in_flight)))
        finally:
            responder.terminate()
            responder.wait()
            server.terminate()
            server.wait()
    print(f"{args.requests} requests, {args.in_flight} in flight, {args.repeat} rounds each, alternating")
    for name, values in rates.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"  tenant in {name}: {statistics.median(values):.0f} req/s (rounds: {shown})")
    ratio = statistics.median(rates["own account"]) / statistics.median(rates["one account"])
    print(f"  own account / one account: {ratio:.2f}")


if __name__ == "__main__":
    main()
