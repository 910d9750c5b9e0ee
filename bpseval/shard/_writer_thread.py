"""The background writer's thread: a shard's writes run in order, with a bounded queue."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

QUEUE_BYTES = 1 << 26
"""Bytes of whole chunks a background writer holds (queued or being written) before `add` waits: 64 MiB.

The chunks a single batch completes are still taken, alone, when nothing else is queued, however large."""


Job = Callable[[], "BaseException | None"]
"""A write: returns the error the writer must raise, or None."""


class WriterThread:
    """A thread running a writer's writes in order, holding at most `limit` bytes of chunks.

    `submit` waits while the queued and running jobs' chunks plus the new one's would exceed `limit`
    (a job larger than `limit` is taken when nothing else is queued). A job returns the error the
    writer must raise, or None; the first error stops the thread, drops the jobs queued after it
    and stays in `error`, and `submit` stops waiting then.
    """

    def __init__(self, name: str, limit: int = QUEUE_BYTES) -> None:
        self.error: BaseException | None = None
        self._limit = limit
        self._jobs: deque[tuple[Job, int]] = deque()
        self._held = 0
        self._stopping = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job, nbytes: int) -> None:
        """Queue `job` (holding `nbytes` of arrays), waiting while the queue is full; not when it failed."""
        with self._changed:
            while self.error is None and self._held and self._held + nbytes > self._limit:
                self._changed.wait()
            if self.error is None:
                self._jobs.append((job, nbytes))
                self._held += nbytes
                self._changed.notify_all()

    def stop(self, drop: bool, wait: float | None = None) -> BaseException | None:
        """End the thread after the queued jobs (or after the running one, with `drop`); the first error.

        Waits at most `wait` seconds when given (then `running` tells whether the thread ended).
        """
        with self._changed:
            self._stopping = True
            if drop:
                self._jobs.clear()
            self._changed.notify_all()
        self._thread.join(wait)
        return self.error

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._jobs and not self._stopping:
                    self._changed.wait()
                if not self._jobs:
                    return
                job, nbytes = self._jobs.popleft()
            try:
                error = job()
            except BaseException as unexpected:  # noqa: BLE001 - anything the job raises is re-raised in the caller's thread
                error = unexpected
            with self._changed:
                self._held -= nbytes
                if error is not None:
                    self.error = error
                    self._jobs.clear()
                self._changed.notify_all()
            if error is not None:
                return
