"""The bulkheads on their own: a real event loop, real threads, no Vault."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import pytest

from provider.admission import Admission, Lane, Ticket
from provider.breaker import EndpointKey
from provider.errors import MountRejected, ProviderError, VaultCircuitOpen

VAULT_A = EndpointKey(address="http://a:8200")
VAULT_B = EndpointKey(address="http://b:8200")


def lane(tenant: str, endpoint: EndpointKey = VAULT_A, namespace: str = "ns") -> Lane:
    return Lane(tenant=(namespace, hash(tenant)), endpoint=endpoint, namespace=namespace)


def run(test: Callable[[Admission], Awaitable[None]], **limits: int) -> None:
    admission = Admission(**limits)

    async def main() -> None:
        admission.bind(asyncio.get_running_loop())
        await test(admission)

    try:
        asyncio.run(main())
    finally:
        admission.close()


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_a_class_runs_at_most_its_share_and_the_next_waits_for_a_release() -> None:
    async def test(admission: Admission) -> None:
        tickets = [await admission.enter(lane("x"), deadline=soon()) for _ in range(2)]
        waiting = asyncio.ensure_future(admission.enter(lane("x"), deadline=soon()))
        await asyncio.sleep(0.05)
        assert not waiting.done() and admission.waiting == 1
        other = await asyncio.wait_for(admission.enter(lane("y"), deadline=soon()), 1)  # another class is not held up
        threading.Thread(target=tickets[0].release).start()  # released from a worker thread
        third = await asyncio.wait_for(waiting, 1)
        assert admission.running == 3
        for ticket in (tickets[1], other, third):
            ticket.release()
        assert admission.running == 0

    run(test, total=10, per_endpoint=10, per_class=2)


def test_an_endpoint_runs_at_most_its_share() -> None:
    async def test(admission: Admission) -> None:
        held = [await admission.enter(lane(f"c{i}"), deadline=soon()) for i in range(3)]
        with pytest.raises(MountRejected, match=r"Vault at http://a:8200 already has 3 Mounts in progress"):
            await admission.enter(lane("c9"), deadline=soon(0.4))
        elsewhere = await asyncio.wait_for(admission.enter(lane("c9", VAULT_B), deadline=soon()), 1)
        for ticket in [*held, elsewhere]:
            ticket.release()

    run(test, total=10, per_endpoint=3, per_class=5)


def test_a_mount_that_cannot_start_in_time_is_answered_before_its_deadline_naming_the_limit() -> None:
    async def test(admission: Admission) -> None:
        held = await admission.enter(lane("x"), deadline=soon())
        started = time.monotonic()
        with pytest.raises(MountRejected) as rejected:
            await admission.enter(lane("x"), deadline=started + 0.5)
        assert time.monotonic() < started + 0.5
        assert "this SecretProviderClass already has 1 Mounts in progress" in str(rejected.value)
        assert "Vault at http://a:8200 is answering slowly or not at all" in str(rejected.value)
        assert admission.waiting == 0
        held.release()

    run(test, total=4, per_endpoint=4, per_class=1)


def test_a_freed_thread_goes_to_the_class_running_the_fewest() -> None:
    async def test(admission: Admission) -> None:
        busy = [await admission.enter(lane("busy"), deadline=soon()) for _ in range(3)]
        quiet = await admission.enter(lane("quiet"), deadline=soon())
        order: list[str] = []

        async def wait(tenant: str) -> Ticket:
            ticket = await admission.enter(lane(tenant), deadline=soon())
            order.append(tenant)
            return ticket

        first = asyncio.ensure_future(wait("busy"))  # arrives first, but its class runs three
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(wait("new"))
        await asyncio.sleep(0.01)
        quiet.release()
        await asyncio.sleep(0.05)
        assert order == ["new"]
        busy[0].release()
        await asyncio.wait_for(first, 1)
        for ticket in [*busy[1:], first.result(), second.result()]:
            ticket.release()

    run(test, total=4, per_endpoint=10, per_class=10)


def test_waiters_are_answered_at_once_when_their_vault_is_known_down() -> None:
    async def test(admission: Admission) -> None:
        held = await admission.enter(lane("x"), deadline=soon())
        down: list[ProviderError | None] = [None]
        waiting = asyncio.ensure_future(admission.enter(lane("x"), deadline=soon(), refusal=lambda: down[0]))
        await asyncio.sleep(0.05)
        down[0] = VaultCircuitOpen("Vault at http://a:8200 has been unreachable since …")
        started = time.monotonic()
        threading.Thread(target=admission.wake).start()  # a breaker changed, on a worker thread
        with pytest.raises(VaultCircuitOpen):
            await asyncio.wait_for(waiting, 1)
        assert time.monotonic() - started < 0.1
        held.release()

    run(test, total=4, per_endpoint=4, per_class=1)


def test_parallel_fetches_borrow_only_threads_nobody_waits_for() -> None:
    async def test(admission: Admission) -> None:
        ticket = await admission.enter(lane("x"), deadline=soon())
        release = threading.Event()
        borrowed = ticket.try_submit(lambda: release.wait(5))
        assert borrowed is not None and admission.running == 2
        assert ticket.try_submit(lambda: None) is None  # the class's share (2) is used up
        release.set()
        await asyncio.wrap_future(borrowed)
        await asyncio.sleep(0.01)
        assert admission.running == 1
        other = await admission.enter(lane("y"), deadline=soon())
        waiter = asyncio.ensure_future(admission.enter(lane("z"), deadline=soon()))
        await asyncio.sleep(0.01)
        assert ticket.try_submit(lambda: None) is None  # someone waits: no borrowing
        other.release()
        (await asyncio.wait_for(waiter, 1)).release()
        ticket.release()
        ticket.release()  # twice is harmless
        assert admission.running == 0

    run(test, total=3, per_endpoint=3, per_class=2)


def test_a_namespace_runs_at_most_its_share_across_its_classes_and_addresses() -> None:
    async def test(admission: Admission) -> None:
        held = [
            await admission.enter(lane(f"c{i}", EndpointKey(address=f"http://dead:1/{i}"), "noisy"), deadline=soon())
            for i in range(3)
        ]
        with pytest.raises(MountRejected, match=r"the pods of namespace 'noisy' already have 3 Mounts in progress"):
            await admission.enter(lane("c9", EndpointKey(address="http://dead:1/9"), "noisy"), deadline=soon(0.4))
        other = await asyncio.wait_for(admission.enter(lane("c0", VAULT_A, "quiet"), deadline=soon()), 1)
        for ticket in [*held, other]:
            ticket.release()

    run(test, total=10, per_endpoint=10, per_class=10, per_namespace=3)
