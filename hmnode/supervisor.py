"""Runs the agent's subsystems as tasks; when one fails or a stop is asked, stops them all."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)


T = TypeVar("T")


@dataclass(frozen=True)
class Subsystem:
    """A named coroutine that runs until it is cancelled; returning or raising is a failure."""

    name: str
    run: Callable[[], Awaitable[None]]


class Supervisor:
    """One task per subsystem; the first failure or stop request cancels the rest, within a grace."""

    def __init__(self, grace_s: float = 4.0) -> None:
        self.grace_s = grace_s
        self._stop = asyncio.Event()
        self.stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """Ask every subsystem to stop (idempotent; the first reason is kept)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    async def run(self, subsystems: Sequence[Subsystem]) -> str | None:
        """Run until stopped; returns None after a requested stop, or what failed."""
        tasks = {asyncio.create_task(_run(s), name=s.name): s for s in subsystems}
        stop_waiter = asyncio.create_task(self._stop.wait(), name="stop-request")
        failure: str | None = None
        try:
            done, _ = await asyncio.wait([*tasks, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task in tasks:
                    failure = _describe(tasks[task].name, task)
                    log.error("subsystem %s failed: %s; shutting the node down", tasks[task].name,
                              failure, exc_info=task.exception())
                    break
        finally:
            stop_waiter.cancel()
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait([*tasks, stop_waiter], timeout=self.grace_s)
            if pending:
                names = ", ".join(sorted(t.get_name() for t in pending))
                log.error("subsystems did not stop within %.1f s: %s", self.grace_s, names)
                failure = failure or f"subsystems did not stop within {self.grace_s:g} s: {names}"
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None and failure is None:
                failure = _describe(tasks[task].name, task)
        return failure


async def _run(subsystem: Subsystem) -> None:
    await subsystem.run()
    raise RuntimeError(f"subsystem {subsystem.name} returned; it must run until cancelled")


def _describe(name: str, task: asyncio.Task) -> str:
    exc = task.exception()
    return f"{name}: {type(exc).__name__}: {exc}"


async def in_daemon_thread(fn: Callable[..., T], *args: Any, name: str = "hmnode-work") -> T:
    """`fn(*args)` on a daemon thread of its own, awaited. For seconds of CPU (a proof, a
    sandboxed job) that cannot be interrupted: a pool thread would hold the process at exit
    until it finished, and SIGTERM must stop the node within 5 s (an unfinished job is found
    "running" in the store and run again at the next start)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop has closed: nobody waits any more

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future
