"""A node runs each invocation id once: copies join the running one or get its answer again."""

import asyncio

from fabric import bus
from fabric.nodes import Once, run_key
from schemas.errors import Error
from schemas.messages import ErrorReply, HaveIt, InvokeReply, WhereIs

CTX = bus.Context(subject="s", headers=None, received_at=0.0, reply="")
KEY = run_key(WhereIs(invocation_id="i", tenant="t", function="f"))


def asked(invocation_id: str, tenant: str = "t") -> WhereIs:
    return WhereIs(invocation_id=invocation_id, tenant=tenant, function="f")


def reply(text: str) -> InvokeReply:
    return InvokeReply(invocation_id="i", node="n", cold_start=False, duration_ms=1.0, output=text.encode())


async def test_a_copy_joins_the_running_invocation_and_a_later_one_gets_the_answer_again() -> None:
    once = Once("n")
    release = asyncio.Event()
    runs = 0

    async def work() -> InvokeReply:
        nonlocal runs
        runs += 1
        await release.wait()
        return reply("done")

    first = asyncio.create_task(once.run(KEY, work))
    await asyncio.sleep(0)
    assert await once.where_is(asked("i"), CTX) == HaveIt(node_id="n", done=False)
    copy = asyncio.create_task(once.run(KEY, work))
    release.set()
    assert (await first).output == (await copy).output == b"done"
    assert (await once.run(KEY, work)).output == b"done"
    assert runs == 1 and once.joined == 2
    assert await once.where_is(asked("i"), CTX) == HaveIt(node_id="n", done=True)
    assert await once.where_is(asked("other"), CTX) == HaveIt(node_id="n", done=False, has=False)


async def test_a_refusal_is_forgotten_so_a_copy_may_run() -> None:
    once = Once("n")
    throttled = ErrorReply(error=Error(code="throttled", message="full"), invocation_id="i")

    async def refuse() -> ErrorReply:
        return throttled

    async def run() -> InvokeReply:
        return reply("ran")

    assert await once.run("i", refuse) is throttled
    assert (await once.run("i", run)).output == b"ran"


async def test_old_answers_are_dropped_beyond_the_limit() -> None:
    once = Once("n", keep=3)

    async def run() -> InvokeReply:
        return reply("x")

    for i in range(5):
        await once.run(run_key(asked(f"id{i}")), run)
    assert not (await once.where_is(asked("id0"), CTX)).has
    assert (await once.where_is(asked("id4"), CTX)).has


async def test_another_tenants_copy_of_an_id_gets_nothing_of_the_first() -> None:
    """A NodeInvoke carrying a tenant's invocation id, sent for another tenant's function, runs
    on its own: it neither joins the first nor gets its answer."""
    once = Once("n")

    async def victims() -> InvokeReply:
        return reply("secret")

    async def attackers() -> InvokeReply:
        return reply("own")

    assert (await once.run(KEY, victims)).output == b"secret"
    replay = run_key(asked("i", tenant="mallory"))
    assert replay != KEY
    assert (await once.run(replay, attackers)).output == b"own"
    assert await once.where_is(asked("i", tenant="mallory"), CTX) == HaveIt(node_id="n", done=True)
    assert await once.where_is(asked("i", tenant="nobody"), CTX) == HaveIt(node_id="n", done=False, has=False)
