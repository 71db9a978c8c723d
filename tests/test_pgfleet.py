"""Sharing accounts out (stream_supervisor/pgfleet.py): the assignment every live replica
computes alike, and the replica registry in PostgreSQL."""

from __future__ import annotations

from collections import Counter

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from stream_supervisor.pgfleet import ReplicaSet, assign

_names = st.lists(st.text("abcdefghij0123456789", min_size=1, max_size=8), min_size=1,
                  max_size=60, unique=True)


@given(accounts=_names, replicas=st.lists(st.text("xyz0123", min_size=1, max_size=6),
                                          min_size=1, max_size=7, unique=True))
def test_every_account_has_one_replica_and_none_has_more_than_its_share(
        accounts: list[str], replicas: list[str]) -> None:
    out = assign(accounts, replicas)
    assert set(out) == set(accounts) and set(out.values()) <= set(replicas)
    cap = -(-len(accounts) // len(replicas))
    assert max(Counter(out.values()).values()) <= cap
    # Deterministic whatever order the live set is read in.
    assert assign(list(reversed(accounts)), list(reversed(replicas))) == out


@pytest.mark.parametrize(("accounts", "replicas"), [(30, 3), (100, 5), (1000, 3)])
def test_a_replica_leaving_or_joining_moves_about_its_share(accounts: int,
                                                             replicas: int) -> None:
    names = [f"account-{i:04d}" for i in range(accounts)]
    hosts = [f"host-{j}" for j in range(replicas)]
    before = assign(names, hosts)
    left = assign(names, hosts[1:])
    joined = assign(names, [*hosts, "host-new"])
    own = sum(1 for r in before.values() if r == hosts[0])
    moved_on_leave = sum(before[a] != left[a] for a in names)
    moved_on_join = sum(before[a] != joined[a] for a in names)
    # The leaver's accounts must move, the joiner must get its share: the cap pushes a
    # few more along, never a large part of the rest.
    assert own <= moved_on_leave <= own + accounts // 10
    assert accounts // (replicas + 1) <= moved_on_join <= accounts // (replicas + 1) \
        + accounts // 10


async def test_replicas_see_each_other_and_a_dead_one_drops_out(database_url: str) -> None:
    names = [f"a{i}" for i in range(9)]
    one = ReplicaSet(database_url, names, replica_id="r1", poll=0.05)
    two = ReplicaSet(database_url, names, replica_id="r2", poll=0.05)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(one.run)
            scope = trio.CancelScope()

            async def run_two() -> None:
                with scope:
                    await two.run()

            nursery.start_soon(run_two)
            while one.live != ("r1", "r2") or two.live != ("r1", "r2"):
                await trio.sleep(0.05)
            mine = {a for a in names if one.owns(a)}
            theirs = {a for a in names if two.owns(a)}
            assert mine | theirs == set(names) and not mine & theirs
            assert {len(mine), len(theirs)} == {4, 5}
            scope.cancel()  # r2 leaves (its row goes with it)
            while len(one.live) != 1:
                await trio.sleep(0.05)
            assert one.live == ("r1",) and all(one.owns(a) for a in names)
            nursery.cancel_scope.cancel()


def test_an_account_goes_only_to_a_replica_that_serves_it() -> None:
    """One unit per account (`stream-supervisor@NAME`), or accounts files that differ for
    a rolling deploy: each account is led by a replica that serves it, and by one only,
    even past the load cap; a replica from before the registry said is taken to serve
    them all."""
    serving: dict[str, list[str] | None] = {
        "unit-momentum": ["momentum"], "unit-hedge": ["hedge"], "unit-arb": ["arb"]}
    out = assign(["momentum", "hedge", "arb"], list(serving), serving)
    assert out == {"momentum": "unit-momentum", "hedge": "unit-hedge", "arb": "unit-arb"}
    # Two hosts running the momentum unit, one the hedge unit: momentum on one of the two.
    serving = {"a-momentum": ["momentum"], "b-momentum": ["momentum"],
               "a-hedge": ["hedge"]}
    out = assign(["momentum", "hedge"], list(serving), serving)
    assert out["hedge"] == "a-hedge" and out["momentum"] in ("a-momentum", "b-momentum")
    # A new file (with "arb") on one replica, the old one on the other: arb goes to the
    # new one whatever the hash prefers, the rest share out.
    serving = {"new": ["momentum", "hedge", "arb"], "old": None}
    out = assign(["momentum", "hedge", "arb"], list(serving), serving)
    assert set(out) == {"momentum", "hedge", "arb"}
    serving = {"new": ["momentum", "hedge", "arb"], "old": ["momentum", "hedge"]}
    assert assign(["momentum", "hedge", "arb"], list(serving), serving)["arb"] == "new"


async def test_units_of_one_account_each_lead_their_own(database_url: str) -> None:
    """Per-account units register in one table: each leads its own account, none waits in
    standby for one another unit was assigned (an account led by nobody, silently)."""
    momentum = ReplicaSet(database_url, ["momentum"], replica_id="unit-momentum", poll=0.05)
    hedge = ReplicaSet(database_url, ["hedge"], replica_id="unit-hedge", poll=0.05)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(momentum.run)
            await nursery.start(hedge.run)
            while momentum.live != ("unit-hedge", "unit-momentum") \
                    or hedge.live != ("unit-hedge", "unit-momentum"):
                await trio.sleep(0.05)
            assert momentum.owns("momentum") and hedge.owns("hedge")
            assert not momentum.owns("hedge") and not hedge.owns("momentum")
            nursery.cancel_scope.cancel()
