"""What Mounts hold of Vault's replies and their files: per Mount, per namespace, per node."""

from __future__ import annotations

import asyncio
import threading

import pytest

from provider import gojson, replymemory
from provider.admission import Admission, Lane
from provider.breaker import EndpointKey
from provider.replymemory import FREE_BYTES, GRAIN_BYTES, NoRoom, ReplyMemory

MIB = 1024 * 1024


def test_a_mount_within_its_own_bytes_never_takes_from_the_node() -> None:
    node = ReplyMemory(total=8 * MIB, namespace_share=4 * MIB)
    memory = node.mount("team")
    memory.count(FREE_BYTES)
    assert node.used() == 0
    memory.count(1)
    assert node.used() == node.used("team") == GRAIN_BYTES  # a grain at once, not a byte
    memory.count(GRAIN_BYTES - 1)
    assert node.used() == GRAIN_BYTES
    memory.close()
    assert node.used() == node.used("team") == 0


def test_a_namespace_past_its_share_is_refused_at_once_and_others_keep_theirs() -> None:
    node = ReplyMemory(total=8 * MIB, namespace_share=3 * MIB)
    greedy = [node.mount("greedy") for _ in range(4)]
    greedy[0].count(FREE_BYTES + 2 * MIB)
    greedy[1].count(FREE_BYTES + MIB - GRAIN_BYTES)
    with pytest.raises(NoRoom) as refused:
        greedy[2].count(FREE_BYTES + GRAIN_BYTES + 1)
    assert "Mounts of namespace greedy (this one included) already hold" in str(refused.value)
    assert f"a namespace may hold {3 * MIB} at once" in str(refused.value)
    assert "(this Mount would hold" in str(refused.value)
    greedy[3].count(FREE_BYTES + GRAIN_BYTES // 2)  # less than a grain still fits
    other = node.mount("other")
    other.count(FREE_BYTES + 3 * MIB)  # its own share, untouched by the greedy one
    assert node.used("other") == 3 * MIB
    for memory in (*greedy, other):
        memory.close()
    assert node.used() == 0


def test_the_node_refuses_past_its_total_whoever_asks() -> None:
    node = ReplyMemory(total=4 * MIB, namespace_share=3 * MIB)
    first, second = node.mount("a"), node.mount("b")
    first.count(FREE_BYTES + 3 * MIB)
    with pytest.raises(NoRoom, match=f"of {4 * MIB} at most"):
        second.count(FREE_BYTES + 2 * MIB)
    second.count(FREE_BYTES + MIB)
    first.close()
    second.close()
    assert node.used() == 0


def test_a_mount_that_has_ended_takes_nothing_more() -> None:
    """A borrowed thread still reading after its Mount ended: what it would take from the
    node would never be given back."""
    node = ReplyMemory(total=4 * MIB, namespace_share=4 * MIB)
    memory = node.mount("team")
    memory.close()
    memory.count(FREE_BYTES)  # its own bytes cost the node nothing
    with pytest.raises(NoRoom, match="the Mount has ended"):
        memory.count(1)
    assert node.used() == 0


def test_counts_from_many_threads_add_up_and_are_all_given_back() -> None:
    node = ReplyMemory(total=64 * MIB, namespace_share=64 * MIB)
    memory = node.mount("team")

    def count() -> None:
        for _ in range(1000):
            memory.count(1000)

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert memory.used == 8 * 1000 * 1000
    assert memory.used - FREE_BYTES <= node.used() < memory.used - FREE_BYTES + GRAIN_BYTES
    memory.close()
    assert node.used() == 0


def test_the_allowance_follows_the_response_limit() -> None:
    node = ReplyMemory.for_responses(4 * MIB)
    assert (node.total, node.namespace_share) == (
        replymemory.NODE_RESPONSES * 4 * MIB,
        replymemory.NAMESPACE_RESPONSES * 4 * MIB,
    )
    assert node.namespace_share >= 3 * 4 * MIB + 4 * MIB  # one whole response: its reply thrice, its file
    small = ReplyMemory.for_responses(100_000)  # a reply of a few MiB is still read
    assert small.namespace_share == replymemory.MIN_NAMESPACE_SHARE and small.total == 2 * small.namespace_share


@pytest.mark.parametrize(
    "raw",
    [b'{"a":1}', b'{"data":{"k":"v,w,[x{"}}', b"[1,[2,{}],[]]", b'"only, a string"', b"{}"],
)
def test_values_are_never_undercounted(raw: bytes) -> None:
    assert replymemory.values_at_most(raw) >= gojson.count_values(raw, few_strings=1_000_000)


def test_counting_without_a_mount_costs_nothing_and_a_borrowed_thread_counts_for_its_mount() -> None:
    """The Mount thread sets CURRENT; the threads it borrows for parallel reads count
    against the same Mount."""
    replymemory.count(10 * MIB)  # no Mount: nothing to count against
    node = ReplyMemory(total=8 * MIB, namespace_share=8 * MIB)
    memory = node.mount("team")
    lane = Lane(tenant="class", endpoint=EndpointKey(address="http://vault:8200"), namespace="team")
    admission = Admission()

    async def borrow() -> None:
        admission.bind(asyncio.get_running_loop())
        ticket = await admission.enter(lane, deadline=float("inf"), refusal=lambda: None)
        token = replymemory.CURRENT.set(memory)
        try:
            borrowed = ticket.try_submit(lambda: replymemory.count(FREE_BYTES + MIB))
            assert borrowed is not None
            await asyncio.wrap_future(borrowed)
        finally:
            replymemory.CURRENT.reset(token)
            ticket.release()

    asyncio.run(borrow())
    assert memory.used == FREE_BYTES + MIB and node.used() == MIB
    memory.close()
    admission.close()
