"""Mount threads: jobs from one queue, run on at most `limit` threads started as needed.

concurrent.futures.ThreadPoolExecutor makes a Future (with a Condition and its lock) and a
work item for every job, and takes and gives back an idle semaphore written in Python
around it: measured with callgrind, a Mount's hand-off from the event loop to a thread and
back cost 125,000 instructions through it and 80,000 through a plain queue. A Mount's job
answers its caller itself (dispatch._answering), so it needs no Future; a fetch borrowed
for parallel reads makes its own (admission.Admission.borrow).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Closed(RuntimeError):
    """The threads are shut down: no job is taken any more."""


class Threads:
    """At most `limit` daemon threads, kept once started; thread-safe. The caller bounds
    how many jobs run at once (admission.Admission never has more than `limit`), so a job
    rarely waits in the queue."""

    def __init__(self, limit: int, *, name: str) -> None:
        self._limit = limit
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._idle = 0  # threads waiting for a job, less the queued jobs waiting for a thread
        self._closed = False

    def submit(self, job: Callable[[], object]) -> None:
        """Run job on a thread. Raises Closed once closed, or the error that kept a needed
        thread from starting (the job is then not taken)."""
        with self._lock:
            if self._closed:
                raise Closed("the Mount threads are shut down")
            self._idle -= 1  # the job claims a waiting thread, or waits for one
            start = self._idle < 0 and self._started < self._limit
            if start:  # a thread of its own
                self._started += 1
                self._idle += 1
            else:  # queued under the lock: always ahead of close()'s stop marks
                self._jobs.put(job)
        if start:
            try:
                threading.Thread(target=self._work, name=f"{self._name}-{self._started}", daemon=True).start()
            except BaseException:
                with self._lock:
                    self._started -= 1  # the job is not taken: its claim went to this thread
                raise
            with self._lock:
                if self._closed:  # closed meanwhile: the new thread ends at its stop mark
                    raise Closed("the Mount threads are shut down")
                self._jobs.put(job)

    def close(self) -> None:
        """No job is taken after this: jobs already queued still run (each is bounded by its
        Mount's deadline), then every thread ends."""
        with self._lock:
            self._closed = True
            for _ in range(self._started):
                self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # a job answers its own errors; this is a defect of ours
                logger.exception("a Mount thread's job failed unexpectedly")
            with self._lock:
                self._idle += 1
