"""Eagerly started coroutines behave as tasks would: same results, errors, cancellation and context."""

import asyncio
import contextvars
import logging

import pytest

from fabric.tasks import TaskSet

current = contextvars.ContextVar("current", default="none")


async def test_a_coroutine_that_never_waits_finishes_inside_the_call_and_leaves_no_task() -> None:
    done: list[str] = []

    async def warm() -> None:
        done.append("ran")

    tasks = TaskSet()
    tasks.spawn_eagerly(warm())
    assert done == ["ran"] and len(tasks) == 0


async def test_a_coroutine_that_waits_goes_on_in_a_task_with_what_it_waited_for() -> None:
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    seen: list[object] = []

    async def waits() -> None:
        token = current.set("mine")
        try:
            seen.append(await first)
            await asyncio.sleep(0)  # a bare yield
            try:
                await second
            except KeyError as exc:
                seen.append(f"raised {exc}")
            seen.append(current.get())
        finally:
            current.reset(token)  # in the context it was set in, or this raises

    tasks = TaskSet()
    tasks.spawn_eagerly(waits())
    assert len(tasks) == 1 and current.get() == "none", "its context is its own"
    first.set_result(1)
    second.set_exception(KeyError("k"))
    await tasks.wait(5)
    assert seen == [1, "raised 'k'", "mine"] and len(tasks) == 0


async def test_closing_cancels_a_waiting_coroutine_where_it_waits() -> None:
    loop = asyncio.get_running_loop()
    never, outcome = loop.create_future(), []

    async def waits() -> None:
        try:
            await never
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    tasks = TaskSet()
    tasks.spawn_eagerly(waits())
    await asyncio.sleep(0)
    await tasks.close()
    assert outcome == ["cancelled"] and never.cancelled()


async def test_a_failure_before_the_first_wait_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise ValueError("bad input")

    with caplog.at_level(logging.ERROR, logger="fabric.tasks"):
        TaskSet().spawn_eagerly(fails(), "handler")
    assert "task handler failed" in caplog.text and "bad input" in caplog.text
