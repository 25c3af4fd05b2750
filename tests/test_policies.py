"""The tier policies on their own: LRU order, budgets from the environment, prefetch picks."""

from __future__ import annotations

import pytest

from kvchunks.common import InvalidInput
from kvchunks.policies.budgets import TierBudgets
from kvchunks.policies.lru import LRU
from kvchunks.policies.prefetch import (
    POLICY_ENV,
    CoActivation,
    Explicit,
    ProvenanceNeighbours,
    make_policy,
)
from kvchunks.store.chunk import ChunkInfo


def chunk(name: str) -> ChunkInfo:
    return ChunkInfo(hash=name * 64, content_hash=name * 64, token_ids=[1])


def test_lru_yields_never_touched_then_least_recent_first_and_skips_kept():
    lru = LRU()
    for h in ("b", "a", "c", "b"):
        lru.touch(h)
    lru.forget("c")
    among = ["a", "b", "c", "z", "y"]  # c, y and z were never touched (c is forgotten)
    assert list(lru.coldest(among, lambda h: False)) == ["c", "y", "z", "a", "b"]
    assert list(lru.coldest(among, lambda h: h in ("y", "a"))) == ["c", "z", "b"]


def test_budgets_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("KVCHUNKS_GPU_BLOCKS", "12")
    monkeypatch.setenv("KVCHUNKS_CPU_BYTES", "4096")
    monkeypatch.setenv("KVCHUNKS_DISK_COMPRESSION", "bf16")
    monkeypatch.delenv("KVCHUNKS_DISK_BYTES", raising=False)
    assert TierBudgets.from_env() == TierBudgets(12, 4096, None, "bf16")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KVCHUNKS_CPU_BYTES", "4G"),
        ("KVCHUNKS_GPU_BLOCKS", "-1"),
        ("KVCHUNKS_GPU_BLOCKS", "0"),  # a pool that may hold nothing, not "no limit"
        ("KVCHUNKS_CPU_BYTES", "²"),  # a digit to str.isdigit, not to int()
        ("KVCHUNKS_DISK_COMPRESSION", "zip"),
    ],
)
def test_a_bad_budget_is_one_clear_error(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidInput, match=name):
        TierBudgets.from_env()


def test_coactivation_picks_chunks_active_together_often_enough():
    policy = CoActivation(min_count=2, limit=2)
    a, b, c, d = (chunk(n) for n in "abcd")
    assert policy.on_activate(a, []) == []
    assert policy.on_activate(a, [b.hash, c.hash]) == []  # together once: not yet
    assert policy.on_activate(a, [b.hash, c.hash, d.hash]) == []  # b and c are active already
    assert policy.on_activate(a, [d.hash]) == [b.hash, c.hash]  # most often first, at most 2
    assert policy.on_activate(b, []) == [a.hash]  # counted both ways


def test_policies_are_chosen_by_name_or_from_the_environment(monkeypatch):
    monkeypatch.delenv(POLICY_ENV, raising=False)
    assert isinstance(make_policy(None, registry=None), ProvenanceNeighbours)
    monkeypatch.setenv(POLICY_ENV, "coactivation")
    assert isinstance(make_policy(None, registry=None), CoActivation)
    assert isinstance(make_policy("explicit", registry=None), Explicit)  # a name wins
    assert make_policy("explicit", registry=None).on_activate(chunk("a"), []) == []
    with pytest.raises(InvalidInput, match="unknown prefetch policy 'nearest'; use one of"):
        make_policy("nearest", registry=None)
    monkeypatch.setenv(POLICY_ENV, "nearest")
    with pytest.raises(InvalidInput, match=f"'nearest' in {POLICY_ENV}; use one of"):
        make_policy(None, registry=None)


class Children:
    """The one registry read the provenance policy makes."""

    def __init__(self, children: dict[str, list[str]]):
        self.of = children

    def children(self, chunk_hash: str) -> list[str]:
        return self.of.get(chunk_hash, [])


def test_provenance_picks_parents_then_children_that_are_not_active():
    p1, p2, c1, c2, c3 = (name * 64 for name in "abcde")
    activated = ChunkInfo(
        hash="f" * 64, content_hash="f" * 64, token_ids=[1], parent_chunks=[p1, p2]
    )
    policy = ProvenanceNeighbours(Children({activated.hash: [c1, p1, c2, c3]}), limit=2)
    # p1 and c1 are active already: the two picks are the first two that are not.
    assert policy.on_activate(activated, [p1, c1]) == [p2, c2]
    assert ProvenanceNeighbours(Children({activated.hash: [c1, p1]})).on_activate(
        activated, []
    ) == [p1, p2, c1]  # each once
