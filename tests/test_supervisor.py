"""The supervisor with real asyncio tasks: one failure stops the node, a stop stops everything."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hmnode.supervisor import Subsystem, Supervisor, in_daemon_thread


def _forever(log: list[str], name: str):
    async def run() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            log.append(f"{name} cleaned up")
    return run


def test_a_failing_subsystem_stops_all_the_others() -> None:
    log: list[str] = []

    async def failing() -> None:
        await asyncio.sleep(0.01)
        raise OSError("disk gone")

    async def main() -> str | None:
        supervisor = Supervisor(grace_s=1.0)
        result = await supervisor.run([Subsystem("a", _forever(log, "a")), Subsystem("bad", failing),
                                       Subsystem("b", _forever(log, "b"))])
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return result

    failure = asyncio.run(main())
    assert failure == "bad: OSError: disk gone"
    assert sorted(log) == ["a cleaned up", "b cleaned up"]


def test_a_stop_request_cancels_everything_and_is_not_a_failure() -> None:
    log: list[str] = []

    async def main() -> tuple[str | None, str | None]:
        supervisor = Supervisor(grace_s=1.0)
        asyncio.get_running_loop().call_later(0.01, supervisor.request_stop, "signal SIGTERM")
        asyncio.get_running_loop().call_later(0.02, supervisor.request_stop, "second reason")
        result = await supervisor.run([Subsystem("a", _forever(log, "a"))])
        return result, supervisor.stop_reason

    assert asyncio.run(main()) == (None, "signal SIGTERM")
    assert log == ["a cleaned up"]


def test_a_subsystem_that_returns_is_a_failure() -> None:
    async def quits() -> None:
        return None

    failure = asyncio.run(Supervisor(grace_s=1.0).run([Subsystem("quits", quits)]))
    assert failure is not None and "quits" in failure and "must run until cancelled" in failure


def test_a_subsystem_that_ignores_cancellation_is_reported_after_the_grace() -> None:
    async def main() -> tuple[str | None, float]:
        released = asyncio.Event()

        async def stubborn() -> None:
            while not released.is_set():
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    continue  # refuses to stop until the test lets it

        supervisor = Supervisor(grace_s=0.2)
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, supervisor.request_stop, "test")
        started = loop.time()
        result = await supervisor.run([Subsystem("stubborn", stubborn)])
        elapsed = loop.time() - started
        released.set()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        return result, elapsed

    failure, elapsed = asyncio.run(main())
    assert failure is not None and "did not stop" in failure and "stubborn" in failure
    assert elapsed < 2.0


def test_in_daemon_thread_returns_raises_and_does_not_hold_the_process() -> None:
    async def main() -> None:
        assert await in_daemon_thread(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ValueError, match="no"):
            await in_daemon_thread(lambda: (_ for _ in ()).throw(ValueError("no")))
        names: list[tuple[str, bool]] = []
        await in_daemon_thread(lambda: names.append((threading.current_thread().name,
                                                     threading.current_thread().daemon)),
                               name="hmnode-test")
        assert names == [("hmnode-test", True)]
    asyncio.run(main())
