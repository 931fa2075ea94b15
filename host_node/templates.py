"""The node's templates, one per function (instance key) that has run here: its later cold starts
fork from it (runtimes/python_template.py). A template is started in the background after the
function's first cold start here, replaced when it dies, and stopped with its function (removed,
drained), or once it has forked nothing and no fork of it has lived for its own keep-alive
(`template_keep_alive_s`)."""

import logging
import time
from collections.abc import Awaitable, Callable

from fabric.tasks import TaskSet
from host_node.quiet import Quiet
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.python_template import Template
from schemas.messages import function_of

log = logging.getLogger(__name__)


class Templates:
    def __init__(self, tasks: TaskSet, enabled: bool, quiet: Quiet | None = None):
        self._tasks = tasks
        self._quiet = quiet or Quiet()  # a template's start waits while the node runs invocations
        self.enabled = enabled
        self._by_key: dict[str, Template] = {}
        self._starting: set[str] = set()
        self.started = 0  # ever, for tests and metrics

    def __len__(self) -> int:
        return len(self._by_key)

    def alive(self) -> int:
        """Templates whose process lives (one that died is dropped at its function's next start)."""
        return sum(template.alive for template in self._by_key.values())

    def keys(self) -> list[str]:
        return list(self._by_key)

    def take(self, key: str) -> Template | None:
        """The function's live template, if it has one (a dead one is dropped: replaced later)."""
        template = self._by_key.get(key)
        if template is not None and not template.alive:
            log.warning("the template of %s exited; it is replaced", key)
            self.drop(key)
            return None
        return template

    def want(self, key: str, start: Callable[[], Awaitable[Template]]) -> None:
        """Start the function's template in the background, unless it has one or one is starting."""
        if self.enabled and key not in self._by_key and key not in self._starting:
            self._starting.add(key)
            self._tasks.spawn(self._start(key, start), f"template {key}")

    async def _start(self, key: str, start: Callable[[], Awaitable[Template]]) -> None:
        try:
            await self._quiet.wait()
            template = await start()
        except (FunctionFailed, OSError) as exc:
            log.warning("no template for %s: %s", key, getattr(exc, "message", exc))
            return
        finally:
            self._starting.discard(key)
        if not self.enabled:  # drained or closed meanwhile
            template.kill()
            return
        self._by_key[key] = template
        self.started += 1

    def drop(self, key: str) -> None:
        """No more forks from the function's template; it stops once its forks have."""
        if (template := self._by_key.pop(key, None)) is not None:
            template.retire()

    def stop_function(self, function: str) -> int:
        """The function was removed: its templates fork no more, and stop once the calls their
        forks run have ended."""
        keys = [key for key in self._by_key if function_of(key) == function]
        for key in keys:
            self.drop(key)
        return len(keys)

    def reap(self, keep_alive_s: float) -> int:
        """Stop templates that forked nothing for the keep-alive and have no fork alive."""
        now = time.monotonic()
        idle = [k for k, t in self._by_key.items() if not t.live_forks and now - t.last_used > keep_alive_s]
        for key in idle:
            self.drop(key)
        return len(idle)

    def close(self) -> None:
        """The node stops: every template and its forks now (the calls were given their grace)."""
        self.enabled = False
        for template in self._by_key.values():
            template.kill()
        self._by_key.clear()
