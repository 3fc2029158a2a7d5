"""Mount threads: real threads, bounded, kept, ended on close."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from provider.threads import Closed, Threads


def names_of_threads(prefix: str) -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith(prefix)}


def test_jobs_run_on_at_most_the_limit_and_threads_are_kept() -> None:
    threads = Threads(3, name="t-limit")
    running, most = 0, 0
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def job() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        done.release()

    try:
        for _ in range(12):  # more than the limit at once: the rest wait in the queue
            threads.submit(job)
        for _ in range(12):
            assert done.acquire(timeout=5)
        assert most == 3 and len(names_of_threads("t-limit")) == 3
        for _ in range(5):  # one at a time: the kept threads take them, none is started
            threads.submit(done.release)
            assert done.acquire(timeout=5)
        assert len(names_of_threads("t-limit")) == 3
    finally:
        threads.close()


def test_a_failing_job_is_logged_and_its_thread_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    threads = Threads(1, name="t-fail")
    done = threading.Event()

    def broken() -> None:
        raise ValueError("a defect")

    try:
        with caplog.at_level(logging.ERROR, logger="provider.threads"):
            threads.submit(broken)
            threads.submit(done.set)
            assert done.wait(5)
        assert "failed unexpectedly" in caplog.text and len(names_of_threads("t-fail")) == 1
    finally:
        threads.close()


def test_closing_ends_every_thread_and_refuses_new_jobs() -> None:
    threads = Threads(4, name="t-close")
    gate = threading.Event()
    ran = []
    for i in range(4):
        threads.submit(lambda i=i: (gate.wait(5), ran.append(i)))
    threads.close()
    with pytest.raises(RuntimeError, match="shut down"):
        threads.submit(lambda: None)
    gate.set()
    deadline = time.monotonic() + 5
    while names_of_threads("t-close") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(ran) == [0, 1, 2, 3] and not names_of_threads("t-close")


def closing_while_submitting(name: str) -> list[threading.Event]:
    """Two threads submit while a third closes; the events of the jobs accepted."""
    threads = Threads(2, name=name)
    accepted: list[threading.Event] = []
    start = threading.Barrier(3)

    def submitter() -> None:
        start.wait()
        for _ in range(20):
            done = threading.Event()
            try:
                threads.submit(done.set)
            except Closed:
                return
            accepted.append(done)

    workers = [threading.Thread(target=submitter) for _ in range(2)]
    for worker in workers:
        worker.start()
    start.wait()
    threads.close()
    for worker in workers:
        worker.join(5)
    return accepted


def test_a_job_accepted_while_closing_runs() -> None:
    """A job queued behind close()'s stop marks was taken and never run: a borrowed fetch's
    Future never completed, and its Mount waited on it for good."""
    for round_ in range(50):
        accepted = closing_while_submitting(f"t-race-{round_}")
        assert all(done.wait(5) for done in accepted), f"round {round_}: an accepted job never ran"


def test_a_thread_that_cannot_start_leaves_no_slot_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = Threads(1, name="t-nostart")
    real_start = threading.Thread.start
    failures = iter([MemoryError("no memory for a stack")])

    def start(self: threading.Thread) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        with pytest.raises(MemoryError):
            threads.submit(lambda: None)
        done = threading.Event()
        threads.submit(done.set)
        assert done.wait(5)
    finally:
        threads.close()
