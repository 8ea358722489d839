"""The threads that run a worker's sync step callables.

Each worker has its own pool, not asyncio's default executor: a sync step that never returns
must neither freeze the sync steps of other runs nor keep the process from exiting.

- The pool runs at most ``size`` callables at once for the worker's live executions. A callable
  whose caller gave up on it (its run was cancelled by a timeout, or abandoned by a stopping
  worker) is *abandoned*: its thread goes on (Python cannot stop a thread) but no longer counts,
  so a replacement thread takes its place, and its result, when it comes, is dropped.
- Threads are daemon threads: a hung one never holds the process at exit (asyncio's default
  executor is joined by ``asyncio.run`` and at interpreter exit, which a hung thread blocks
  forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any


class _Job:
    """One call: run in a thread, its outcome set on ``future`` in the caller's loop."""

    __slots__ = ("abandoned", "call", "finished", "future", "loop", "started")

    def __init__(
        self, call: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]
    ) -> None:
        self.call, self.loop, self.future = call, loop, future
        self.started = self.finished = self.abandoned = False


class StepThreads:
    """A pool of daemon threads for sync step callables (see the module docstring).

    Args:
        size: callables running at once, at most (abandoned ones not counted).
        name: the threads' name prefix.
    """

    def __init__(self, size: int, name: str = "engine-step") -> None:
        if size < 1:
            raise ValueError("threads must be at least 1")
        self.size = size
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0  # live threads, abandoned ones included
        self._idle = 0  # threads waiting for a job
        self._queued = 0  # jobs no thread has taken yet
        self._abandoned = 0  # threads still running an abandoned job

    @property
    def abandoned(self) -> int:
        """Threads still running a callable whose caller gave up on it."""
        return self._abandoned

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Runs ``fn(*args, **kwargs)`` in a thread (with the caller's context variables) and
        returns its result. Cancelling the caller abandons the call (see the module docstring).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        job = _Job(call, loop, future)
        self._submit(job)
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(job)
            raise

    def close(self) -> None:
        """Lets the idle threads end (busy ones end after their call; none is waited for)."""
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._jobs.put(None)

    def _submit(self, job: _Job) -> None:
        with self._lock:
            self._queued += 1
            working = self._threads - self._abandoned
            spawn = self._queued > self._idle and working < self.size
            if spawn:
                self._threads += 1
                self._idle += 1
        if spawn:
            name = f"{self._name}-{self._threads}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        self._jobs.put(job)

    def _abandon(self, job: _Job) -> None:
        with self._lock:
            if job.finished or job.abandoned:
                return
            job.abandoned = True
            if job.started:
                self._abandoned += 1  # it holds a thread: count a replacement in
            # A job not started yet is skipped by the thread that takes it.

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                if job is None:
                    self._threads -= 1
                    return
                self._queued -= 1
                skip = job.abandoned
                job.started = True
            if not skip:
                self._execute(job)
            with self._lock:
                job.finished = True
                if job.abandoned and not skip:
                    self._abandoned -= 1
                self._idle += 1

    @staticmethod
    def _execute(job: _Job) -> None:
        try:
            outcome: tuple[bool, Any] = (True, job.call())
        except BaseException as exc:  # handed to the caller, as a thread pool does
            outcome = (False, exc)
        if job.abandoned:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for it any more
            job.loop.call_soon_threadsafe(_settle, job.future, outcome)


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
