"""ChunkRegistry against a real embedded Redis: records, prefixes, tags, provenance, contexts."""

from __future__ import annotations

import dataclasses
import re
import threading
import uuid

import pytest

from kvchunks.common import (
    AmbiguousHash,
    ChunkInUse,
    ChunkNotFound,
    ConcurrentChange,
    InvalidInput,
    RegistryUnavailable,
)
from kvchunks.store.audit import registry_violations
from kvchunks.store.chunk import ChunkInfo, ChunkRecord, SourceSpan
from kvchunks.store.hashing import chunk_hash, content_hash, context_hash, model_fingerprint
from kvchunks.store.redis_server import close, connect_embedded
from kvchunks.store.registry import ChunkRegistry
from kvchunks.store.tier_records import TierRecords

FP = model_fingerprint("LlamaForCausalLM", "ab" * 32, "float32", 256, [])


def make_chunk(tokens: list[int], parents: tuple[ChunkRecord, ...] = (), **fields) -> ChunkRecord:
    positions, at = [], 0
    for parent in parents:
        positions.append((parent.hash, at))
        at += parent.token_count
    return ChunkRecord(
        hash=chunk_hash(FP, context_hash(positions), at, tokens),
        content_hash=content_hash(tokens),
        token_ids=list(tokens),
        parent_chunks=[p.hash for p in parents],
        position=at,
        layout="timeline" if parents else "standalone",
        **fields,
    )


def fake_hash(prefix: str, fill: str = "0") -> str:
    return prefix + fill * (64 - len(prefix))


def chunk_with_hash(h: str, **fields) -> ChunkRecord:
    return ChunkRecord(hash=h, content_hash=content_hash([1]), token_ids=[1], **fields)


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    client = connect_embedded(tmp_path_factory.mktemp("registry"))
    yield client
    close(client)


@pytest.fixture
def reg(redis_client) -> ChunkRegistry:
    return ChunkRegistry(redis_client, namespace=f"t-{uuid.uuid4().hex[:12]}")


def test_put_get_round_trip(reg):
    chunk = make_chunk(
        [1, 2, 3],
        role="system",
        tags=["facts"],
        metadata={"source": "a.txt", "n": 3},
        text="abc",
        sources=[SourceSpan("ab" * 32, 0, 3)],
        generation_params={"temperature": 0.5, "seed": None},
    )
    assert reg.put(chunk, tier="cpu") is True
    assert reg.get(chunk.hash) == ChunkInfo.view(chunk, "cpu")
    assert reg.exists(chunk.hash)
    other = make_chunk([4])
    reg.put(other)  # a chunk whose tier was never recorded has its KV in its file
    assert reg.get(other.hash) == ChunkInfo.view(other, "disk")
    with pytest.raises(InvalidInput, match="unknown tier"):
        reg.put(make_chunk([5]), tier="tape")
    assert not reg.exists(make_chunk([5]).hash)


def test_put_of_an_existing_hash_changes_nothing(reg):
    chunk = make_chunk([1, 2, 3], text="first")
    assert reg.put(chunk)
    again = make_chunk([1, 2, 3], text="second", tags=["x"])
    assert reg.put(again) is False
    assert reg.get(chunk.hash).text == "first"
    assert reg.list_chunks(tag="x") == []


def test_unknown_and_malformed_hashes(reg):
    with pytest.raises(ChunkNotFound):
        reg.get(fake_hash("dead"))
    with pytest.raises(InvalidInput):
        reg.get("dead")  # a prefix: resolve it first
    assert not reg.exists(fake_hash("dead"))


def test_resolve_prefixes_git_style(reg):
    a, b, c = fake_hash("abcd0", "1"), fake_hash("abcd1", "2"), fake_hash("ffff", "3")
    for h in (a, b, c):
        reg.put(chunk_with_hash(h))
    assert reg.resolve(a) == a
    assert reg.resolve("abcd0") == a
    assert reg.resolve("ABCD1") == b
    assert reg.resolve(" ffff ") == c
    with pytest.raises(AmbiguousHash) as info:
        reg.resolve("abcd")
    assert info.value.candidates == [a, b]
    assert a[:12] in str(info.value) and b[:12] in str(info.value)
    with pytest.raises(ChunkNotFound):
        reg.resolve("abce")
    for bad in ("abc", "xyz1", "", "abcd-", "a" * 65):
        with pytest.raises(InvalidInput):
            reg.resolve(bad)


def test_tags_index_follows_the_record(reg):
    one, two = make_chunk([1]), make_chunk([2], tags=["x"])
    reg.put(one)
    reg.put(two)
    reg.add_tag(one.hash, "x")
    reg.add_tag(one.hash, "x")  # idempotent
    assert reg.get(one.hash).tags == ["x"]
    assert {c.hash for c in reg.list_chunks(tag="x")} == {one.hash, two.hash}
    reg.remove_tag(one.hash, "x")
    assert [c.hash for c in reg.list_chunks(tag="x")] == [two.hash]
    reg.update(two.hash, tags=["y", "z"])
    assert reg.list_chunks(tag="x") == []
    assert [c.hash for c in reg.list_chunks(tag="z")] == [two.hash]
    with pytest.raises(InvalidInput):
        reg.add_tag(one.hash, "has space")


def test_content_hash_finds_the_same_tokens_in_any_context(reg):
    doc = make_chunk([9, 9])
    again = make_chunk([5, 6], parents=(doc,))
    alone = make_chunk([5, 6])
    for chunk in (doc, again, alone):
        reg.put(chunk)
    assert again.hash != alone.hash
    assert reg.by_content(content_hash([5, 6])) == sorted([again.hash, alone.hash])


def test_provenance_edges_and_their_removal(reg, redis_client):
    a = make_chunk([1])
    b = make_chunk([2], parents=(a,))
    c = make_chunk([3], parents=(a, b))
    for chunk in (a, b, c):
        reg.put(chunk)
    assert reg.parents(c.hash) == [a.hash, b.hash]
    assert reg.children(a.hash) == sorted([b.hash, c.hash])
    assert reg.children(b.hash) == [c.hash]

    reg.delete(b.hash)
    assert reg.parents(c.hash) == [a.hash]
    assert reg.children(a.hash) == [c.hash]
    assert reg.get(c.hash).parent_chunks == [a.hash, b.hash]  # the record keeps its history
    reg.delete(c.hash)
    leftover = [k for k in redis_client.keys(f"{reg.namespace}:*") if b.hash.encode() in k]
    assert leftover == []


def test_edges_come_back_when_a_deleted_parent_is_stored_again(reg):
    """The same text loaded again (or imported) has the same hash: the chunks computed after
    it, which outlived its deletion, are its children again, in their parents' order."""
    a, b = make_chunk([1]), make_chunk([2])
    c = make_chunk([3], parents=(a, b))
    gone_child = make_chunk([4], parents=(a,))
    for chunk in (a, b, c, gone_child):
        reg.put(chunk)
    reg.delete(a.hash)
    assert reg.parents(c.hash) == [b.hash] and reg.parents(gone_child.hash) == []
    reg.delete(gone_child.hash)
    assert reg.put(a)
    assert reg.parents(c.hash) == [a.hash, b.hash]
    assert reg.children(a.hash) == [c.hash]
    assert registry_violations(reg) == []


def test_edges_to_a_parent_stored_after_its_child(reg):
    ghost = make_chunk([7])
    child = make_chunk([8], parents=(ghost,))
    reg.put(child)
    assert reg.parents(child.hash) == []
    reg.put(ghost)
    assert reg.children(ghost.hash) == [child.hash] and reg.parents(child.hash) == [ghost.hash]


def test_delete_cleans_every_index_and_context(reg, redis_client):
    keep, gone = make_chunk([1]), make_chunk([2], tags=["t"])
    reg.put(keep)
    reg.put(gone)
    for ctx in ("one", "two"):
        reg.activate(ctx, gone.hash)
        reg.activate(ctx, keep.hash)
    reg.delete(gone.hash)
    assert not reg.exists(gone.hash)
    assert reg.active("one") == [keep.hash] and reg.active("two") == [keep.hash]
    assert reg.list_chunks(tag="t") == []
    assert reg.by_content(gone.content_hash) == []
    with pytest.raises(ChunkNotFound):
        reg.resolve(gone.hash[:8])
    with pytest.raises(ChunkNotFound):
        reg.delete(gone.hash)
    assert not any(gone.hash.encode() in k for k in redis_client.keys(f"{reg.namespace}:*"))


def make_view(sources: list[ChunkRecord], **fields) -> ChunkRecord:
    """A composed view over the whole of each source."""
    tokens = [t for c in sources for t in c.token_ids]
    spans = [SourceSpan(c.hash, 0, c.token_count) for c in sources]
    return ChunkRecord(
        hash=chunk_hash(FP, context_hash([(c.hash, 0) for c in sources], "composed"), 0, tokens),
        content_hash=content_hash(tokens),
        token_ids=tokens,
        kind="composed",
        layout="view",
        parent_chunks=list(dict.fromkeys(c.hash for c in sources)),
        sources=spans,
        **fields,
    )


def test_a_view_references_its_sources_while_it_is_stored(reg):
    """The count changes in the same transaction as the view: no crash in between can leave
    a source counted for a view that is gone, or the reverse."""
    source, other = make_chunk([1, 2]), make_chunk([3])
    reg.put(source)
    reg.put(other)
    twice = make_view([source, other, source])
    assert reg.put(twice) and not reg.put(twice)  # stored once: counted once
    assert [reg.get(c.hash).ref_count for c in (source, other)] == [1, 1]
    with pytest.raises(ChunkInUse, match="referenced 1 time"):
        reg.delete(source.hash)
    assert reg.exists(source.hash)
    reg.delete(twice.hash)
    assert [reg.get(c.hash).ref_count for c in (source, other)] == [0, 0]
    reg.delete(source.hash)
    assert not reg.exists(source.hash)


def test_a_view_over_a_deleted_chunk_is_not_stored(reg):
    source, gone = make_chunk([4]), make_chunk([5])
    reg.put(source)
    reg.put(gone)
    reg.delete(gone.hash)
    view = make_view([source, gone])
    with pytest.raises(ChunkNotFound):
        reg.put(view)
    assert not reg.exists(view.hash) and reg.get(source.hash).ref_count == 0


def test_a_forced_delete_leaves_the_views_over_it_deletable(reg):
    source, other = make_chunk([6]), make_chunk([7])
    reg.put(source)
    reg.put(other)
    view = make_view([source, other])
    reg.put(view)
    reg.delete(source.hash, force=True)
    reg.delete(view.hash)  # the source gone, the other's reference is still taken back
    assert not reg.exists(view.hash) and reg.get(other.hash).ref_count == 0


def test_a_take_back_keeps_a_chunk_computed_after_or_active(reg):
    """What a call with store=False takes back: not a chunk that meanwhile became another
    chunk's parent or was activated."""
    first, lone = make_chunk([11]), make_chunk([13])
    after = make_chunk([12], (first,))
    for chunk in (first, after, lone):
        reg.put(chunk)
    reg.activate("busy", lone.hash)
    assert not reg.take_back(first.hash) and not reg.take_back(lone.hash)
    assert all(reg.exists(c.hash) for c in (first, after, lone))
    assert reg.take_back(after.hash)
    assert reg.take_back(first.hash)  # nothing computed after it is left
    reg.deactivate("busy", lone.hash)
    assert reg.take_back(lone.hash)
    assert not any(reg.exists(c.hash) for c in (first, after, lone))
    with pytest.raises(ChunkNotFound):
        reg.take_back(lone.hash)


def test_an_activation_between_the_check_and_the_delete_keeps_the_chunk(reg, redis_client):
    """The context's active list is watched with the check: an activation that lands after
    the check retries the take-back, which then sees it."""
    chunk, other = make_chunk([14]), make_chunk([15])
    reg.put(chunk)
    reg.put(other)
    reg.activate("busy", other.hash)  # the context exists: only its active list changes
    raced = []

    class Racing(ChunkRegistry):
        def _used(self, pipe, chunk_hash, children, contexts):
            used = super()._used(pipe, chunk_hash, children, contexts)
            if not raced:
                raced.append(chunk_hash)
                reg.activate("busy", chunk_hash)  # another client, after the check
            return used

    assert not Racing(redis_client, namespace=reg.namespace).take_back(chunk.hash)
    assert raced == [chunk.hash] and reg.exists(chunk.hash)
    assert reg.active("busy") == [other.hash, chunk.hash]


def hold_keys(reg: ChunkRegistry, redis_client) -> list[bytes]:
    """The registry's keys for holds: none once no call holds anything."""
    keys = redis_client.keys(f"{reg.namespace}:*")
    return [k for k in keys if re.search(rb":(hold|kept|unwanted):", k)]


def test_a_chunk_taken_back_while_held_goes_with_its_last_hold(reg, redis_client):
    a, b = make_chunk([21]), make_chunk([22])
    reg.put(a)
    reg.put(b)
    reg.hold("one", [a.hash, b.hash])
    reg.hold("one", [a.hash])  # again (a command resent): still one hold
    reg.hold("two", [a.hash])
    assert reg.held() == sorted([a.hash, b.hash])
    assert registry_violations(reg) == [
        f"chunk {h[:12]}: held by a call that has ended" for h in sorted([a.hash, b.hash])
    ]
    assert not reg.take_back(a.hash) and not reg.take_back(b.hash)  # marked, not deleted
    assert reg.exists(a.hash) and reg.exists(b.hash)
    assert reg.let_go("one", [a.hash, b.hash]) == b.hash  # "two" still holds a
    assert reg.let_go("one", [a.hash, b.hash]) == b.hash  # resent: the same answer
    assert reg.let_go("two", [a.hash]) == a.hash
    assert reg.exists(a.hash)  # the caller of let_go takes them back, marked
    assert reg.take_back(a.hash, marked=True) and reg.take_back(b.hash, marked=True)
    assert hold_keys(reg, redis_client) == [] and reg.held() == []


def test_a_chunk_a_call_made_goes_with_its_hold_unless_a_holder_kept_it(reg, redis_client):
    """Made by a call that holds it, a chunk is marked as one taken back: it goes when its
    last holder lets go, whether the maker ended or died (its holds let go by another),
    unless the maker or another holder stored it as its own. Found (already stored) it is
    not marked."""
    dropped, kept_by_other, kept_by_maker, found = (make_chunk([n]) for n in (31, 32, 33, 34))
    assert reg.put(found)
    reg.hold("maker", [c.hash for c in (dropped, kept_by_other, kept_by_maker, found)])
    for chunk in (dropped, kept_by_other, kept_by_maker):
        assert reg.put(chunk, made_by_call=True)
    assert not reg.put(found, made_by_call=True)  # stored before: not the call's to drop
    reg.hold("keeper", [kept_by_other.hash])
    assert reg.let_go("keeper", [kept_by_other.hash], kept=[kept_by_other.hash]) is None
    order = [kept_by_maker.hash, kept_by_other.hash, dropped.hash, found.hash]
    assert reg.let_go("maker", order, kept=[kept_by_maker.hash]) == dropped.hash
    assert reg.take_back(dropped.hash, marked=True)
    assert reg.let_go("maker", order[3:]) is None
    assert reg.missing([c.hash for c in (dropped, kept_by_other, kept_by_maker, found)]) == [
        dropped.hash
    ]
    assert hold_keys(reg, redis_client) == []


def test_a_keeper_between_the_last_let_go_and_its_take_back_wins(reg, redis_client):
    """A call that finds the chunk and keeps it after the maker let go of it, before the
    maker's take-back came: the take-back leaves it."""
    chunk = make_chunk([26])
    reg.put(chunk)
    reg.hold("maker", [chunk.hash])
    assert not reg.take_back(chunk.hash)
    assert reg.let_go("maker", [chunk.hash]) == chunk.hash
    reg.hold("keeper", [chunk.hash])
    assert not reg.take_back(chunk.hash, marked=True)  # held again: the mark stays
    assert reg.let_go("keeper", [chunk.hash], kept=[chunk.hash]) is None
    assert not reg.take_back(chunk.hash, marked=True)
    assert reg.exists(chunk.hash) and hold_keys(reg, redis_client) == []


def test_a_marked_chunk_in_use_keeps_no_mark(reg, redis_client):
    parent = make_chunk([27])
    child = make_chunk([28], (parent,))
    reg.put(parent)
    reg.put(child)
    reg.hold("call", [parent.hash])
    assert not reg.take_back(parent.hash)
    assert reg.let_go("call", [parent.hash]) == parent.hash
    assert not reg.take_back(parent.hash, marked=True)  # the child was computed after it
    assert reg.exists(parent.hash) and hold_keys(reg, redis_client) == []


def test_a_chunk_marked_while_one_computed_after_it_is_held_waits_for_that_hold(reg, redis_client):
    """A call keeping nothing made a message and a prompt after it; another call reads the
    prompt and holds the message (the prompt's lineage) only a moment later. The maker lets
    go in between: the message keeps its mark, and goes after the prompt."""
    message = make_chunk([31])
    prompt = make_chunk([32], (message,))
    reg.put(message)
    reg.put(prompt)
    reg.hold("maker", [message.hash, prompt.hash])
    reg.hold("reader", [prompt.hash])
    assert not reg.take_back(prompt.hash) and not reg.take_back(message.hash)  # marked
    assert reg.let_go("maker", [prompt.hash, message.hash]) == message.hash
    assert not reg.take_back(message.hash, marked=True)  # the prompt is held: still marked
    reg.hold("reader", [message.hash])  # the reader's lineage
    assert reg.let_go("reader", [prompt.hash, message.hash]) == prompt.hash
    assert reg.take_back(prompt.hash, marked=True)
    assert reg.let_go("reader", [message.hash]) == message.hash
    assert reg.take_back(message.hash, marked=True)
    assert not reg.exists(message.hash) and hold_keys(reg, redis_client) == []


def test_a_call_lets_go_of_a_chunk_only_once_what_it_computed_after_it_is_gone(reg, redis_client):
    """Two calls keeping nothing share a message; the second computed its prompt after it.
    Whichever lets go first, the message is not left behind."""
    message = make_chunk([29])
    prompt = make_chunk([30], (message,))
    reg.put(message)
    reg.put(prompt)
    reg.hold("first", [message.hash])
    reg.hold("second", [message.hash, prompt.hash])
    for chunk in (message, prompt):
        assert not reg.take_back(chunk.hash)  # each call takes back what it made: marked
    # The second stops at its prompt, still holding the message it was computed after.
    assert reg.let_go("second", [prompt.hash, message.hash]) == prompt.hash
    assert reg.let_go("first", [message.hash]) is None  # the second holds it
    assert reg.take_back(prompt.hash, marked=True)
    assert reg.let_go("second", [message.hash]) == message.hash
    assert reg.take_back(message.hash, marked=True)
    assert not reg.exists(message.hash) and hold_keys(reg, redis_client) == []


def test_a_chunk_a_holder_keeps_is_not_taken_back(reg, redis_client):
    """Kept by one call while another (its maker) still holds it: the maker's take-back,
    before or after, leaves it; the mark goes with the last hold."""
    early, late = make_chunk([23]), make_chunk([24])
    for chunk in (early, late):
        reg.put(chunk)
        reg.hold("maker", [chunk.hash])
        reg.hold("reader", [chunk.hash])
    assert not reg.take_back(early.hash)  # before the reader keeps it
    assert reg.let_go("reader", [early.hash, late.hash], kept=[early.hash, late.hash]) is None
    assert not reg.take_back(late.hash)  # after
    assert reg.let_go("maker", [late.hash, early.hash]) is None
    assert reg.exists(early.hash) and reg.exists(late.hash)
    assert hold_keys(reg, redis_client) == []
    assert reg.take_back(late.hash)  # no one holds or keeps it now


def test_a_delete_clears_the_holds(reg, redis_client):
    chunk = make_chunk([25])
    reg.put(chunk)
    reg.hold("call", [chunk.hash])
    assert not reg.take_back(chunk.hash)
    reg.delete(chunk.hash)
    assert hold_keys(reg, redis_client) == []
    assert reg.let_go("call", [chunk.hash]) is None and hold_keys(reg, redis_client) == []


def test_concurrent_views_and_tags_lose_no_count_and_no_tag(reg):
    source = make_chunk([8])
    reg.put(source)
    parts = [make_chunk([100 + i]) for i in range(40)]
    for part in parts:
        reg.put(part)

    def make_views(start: int) -> None:
        for part in parts[start : start + 10]:
            reg.put(make_view([source, part]))

    def tag() -> None:
        for i in range(10):
            reg.add_tag(source.hash, f"t{i}")

    threads = [threading.Thread(target=make_views, args=(i,)) for i in range(0, 40, 10)]
    threads.append(threading.Thread(target=tag))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = reg.get(source.hash)
    assert stored.ref_count == 40 and sorted(stored.tags) == sorted(f"t{i}" for i in range(10))


def test_update_changes_only_updatable_fields(reg):
    chunk = make_chunk([1, 2])
    reg.put(chunk)
    updated = reg.update(chunk.hash, metadata={"source": "b"})
    assert updated.metadata == {"source": "b"} and reg.get(chunk.hash).metadata == {"source": "b"}
    # A view's state is not in the record: the tier has set_tiers, activity the contexts.
    changes = (("token_ids", [3]), ("hash", "0" * 64), ("ref_count", 3), ("tier", "cpu"))
    for field, value in (*changes, ("is_active", True), ("segments", [])):
        with pytest.raises(InvalidInput, match="cannot update"):
            reg.update(chunk.hash, **{field: value})
    expected = dataclasses.replace(chunk, metadata={"source": "b"})
    assert reg.get(chunk.hash) == ChunkInfo.view(expected, "disk")


def test_records_read_again_are_copies_and_changes_are_seen(reg, redis_client):
    metadata = {"source": "a", "pages": [1, 2], "by": {"name": "n", "at": [{"line": 4}]}}
    chunk = make_chunk([5, 6, 7], metadata=metadata, tags=["x"])
    reg.put(chunk)
    first = reg.get(chunk.hash)
    first.token_ids.append(8)
    first.tags.append("y")
    first.metadata["pages"].append(3)
    first.metadata["by"]["at"][0]["line"] = 5
    again = reg.get(chunk.hash)  # parsed before: a copy of that parse, untouched by the above
    assert again == ChunkInfo.view(chunk, "disk") and again is not first
    reg.update(chunk.hash, tags=["z"])  # another writer's change: a new record, parsed anew
    assert reg.get(chunk.hash).tags == ["z"]
    # A record damaged in Redis is checked again, however often the good one was read.
    key = reg._chunk_key(chunk.hash)
    redis_client.set(key, redis_client.get(key).replace(b"\xa6source", b"\xa6sourcf"))
    assert reg.get(chunk.hash).metadata["sourcf"] == "a"
    redis_client.set(key, b"\x81\xa7version\x63")
    with pytest.raises(InvalidInput, match="version"):
        reg.get(chunk.hash)


def test_parsed_records_are_kept_up_to_a_number_of_tokens(reg):
    reg._parsed.max_tokens = 10
    chunks = [make_chunk([i, i + 1, i + 2, i + 3]) for i in range(0, 40, 4)]
    for chunk in chunks:
        reg.put(chunk)
        reg.get(chunk.hash)
    assert list(reg._parsed._records) == [c.hash for c in chunks[-2:]]  # 8 tokens of at most 10
    assert [c.token_ids for c in reg.get_many([c.hash for c in chunks])] == [
        c.token_ids for c in chunks
    ]


def test_get_present_leaves_out_a_chunk_deleted_since_its_hash_was_read(reg):
    a, b, c = make_chunk([1]), make_chunk([2]), make_chunk([3])
    for chunk in (a, b, c):
        reg.put(chunk)
    reg.delete(b.hash)
    assert [x.hash for x in reg.get_present([c.hash, b.hash, a.hash])] == [c.hash, a.hash]
    with pytest.raises(ChunkNotFound, match=b.hash):
        reg.get_many([c.hash, b.hash, a.hash])


def test_tier_records_land_in_order_and_wait_out_a_failing_redis(reg, monkeypatch):
    a, b = make_chunk([1]), make_chunk([2])
    for chunk in (a, b):
        reg.put(chunk)
    records = TierRecords(reg)
    for tier in ("gpu", "cpu", "disk", "cpu"):
        records.record(a.hash, tier)
    records.record(b.hash, "gpu")
    records.record(fake_hash("ee"), "cpu")  # no such chunk: skipped
    with pytest.raises(InvalidInput):
        records.record(a.hash, "tape")
    records.flush()
    assert reg.get(a.hash).tier == "cpu" and reg.get(b.hash).tier == "gpu"
    assert not reg.exists(fake_hash("ee"))

    def refuse(tiers):
        raise RegistryUnavailable("the chunk registry's Redis failed: down")

    monkeypatch.setattr(reg, "set_tiers", refuse)
    records.record(a.hash, "disk")
    records.flush()
    assert reg.get(a.hash).tier == "cpu"
    monkeypatch.undo()
    records.record(b.hash, "cpu")
    records.close()
    assert reg.get(a.hash).tier == "disk" and reg.get(b.hash).tier == "cpu"


def test_tier_records_of_a_deleted_chunk_are_forgotten(reg):
    chunk = make_chunk([3])
    reg.put(chunk, tier="gpu")
    records = TierRecords(reg)
    records.record(chunk.hash, "cpu")
    records.forget(chunk.hash)  # deleted meanwhile; made again below with the same hash
    assert records.latest(chunk.hash) is None
    records.flush()
    assert reg.get(chunk.hash).tier == "gpu"
    records.close()


def test_contexts_are_ordered_idempotent_and_independent(reg):
    a, b, c = (make_chunk([i], created_at=float(i)) for i in (1, 2, 3))
    for chunk in (a, b, c):
        reg.put(chunk)
    assert reg.activate("alice", c.hash) and reg.activate("alice", a.hash)
    assert reg.activate("alice", c.hash) is False
    assert reg.activate("bob", b.hash)
    assert reg.active("alice") == [c.hash, a.hash]
    assert reg.active("bob") == [b.hash]
    assert reg.get(a.hash, context="alice").is_active
    assert not reg.get(a.hash, context="bob").is_active
    found, active = reg.find_with_active(a.hash[:8], "alice")  # one read for both
    assert found.hash == a.hash and found.is_active and active == [c.hash, a.hash]
    assert reg.find_with_active(b.hash, "alice")[1] == [c.hash, a.hash]
    gone = reg.find_and_deactivate(a.hash[:8], "alice")  # read and removed in one round trip
    assert gone.hash == a.hash and not gone.is_active and reg.active("alice") == [c.hash]
    with pytest.raises(ChunkNotFound):
        reg.find_and_deactivate(fake_hash("beef"), "alice")
    assert reg.find_and_deactivate(b.hash, "alice").hash == b.hash  # was not active there
    assert reg.active("alice") == [c.hash] and reg.active("bob") == [b.hash]
    reg.activate("alice", a.hash)
    assert [x.is_active for x in reg.list_chunks(context="bob")] == [False, True, False]

    assert reg.deactivate("alice", c.hash) is True
    assert reg.deactivate("alice", c.hash) is False
    assert reg.active("alice") == [a.hash]
    reg.activate("alice", c.hash)
    assert reg.active("alice") == [a.hash, c.hash]  # re-activation appends
    reg.clear_context("alice")
    assert reg.active("alice") == [] and reg.active("bob") == [b.hash]
    assert reg.contexts() == ["alice", "bob"]
    with pytest.raises(ChunkNotFound):
        reg.activate("alice", fake_hash("beef"))


def test_concurrent_activation_adds_once(reg):
    chunk = make_chunk([5])
    reg.put(chunk)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(reg.activate("ctx", chunk.hash)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert reg.active("ctx") == [chunk.hash]


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "a:b", "ctx/1", "é", None])
def test_invalid_context_names(reg, name):
    with pytest.raises(InvalidInput):
        reg.active(name)
    with pytest.raises(InvalidInput):
        reg.update_settings(name, {"mode": "exact"})


def test_context_settings_keep_their_types(reg):
    assert reg.settings("default") == {}
    reg.update_settings("default", {"mode": "reuse", "auto_activate": True, "n": 3})
    reg.update_settings("default", {"auto_activate": False, "extra": None})
    assert reg.settings("default") == {
        "mode": "reuse",
        "auto_activate": False,
        "n": 3,
        "extra": None,
    }
    assert reg.settings("other") == {}
    assert reg.contexts() == ["default"]
    with pytest.raises(InvalidInput):
        reg.update_settings("default", {"bad": object()})


def test_list_filters_by_glob_and_tag_in_creation_order(reg):
    first = make_chunk([1], text="The capital of France", created_at=1.0)
    second = make_chunk([2], text="pasta recipes", tags=["food"], created_at=2.0)
    third = make_chunk([3], metadata={"source": "notes/Paris.md"}, created_at=3.0)
    for chunk in (third, first, second):
        reg.put(chunk)

    def hashes(**kw):
        return [c.hash for c in reg.list_chunks(**kw)]

    assert hashes() == [first.hash, second.hash, third.hash]
    assert hashes(pattern="capital") == [first.hash]  # no glob characters: substring
    assert hashes(pattern="the CAPITAL*") == [first.hash]  # case-insensitive glob
    assert hashes(pattern="*.md") == [third.hash]  # metadata source
    assert hashes(pattern="foo?") == [second.hash]  # tags
    assert hashes(pattern=second.hash[:10]) == [second.hash]  # hash
    assert hashes(pattern=second.hash[1:11]) == []  # from its start, as a ref
    assert hashes(pattern=f"*{second.hash[1:11]}*") == [second.hash]  # unless a glob says
    assert hashes(pattern="fr*") == []  # a glob is anchored
    assert hashes(tag="food", pattern="pasta*") == [second.hash]
    assert hashes(tag="none") == []


def test_namespaces_are_isolated(redis_client):
    one = ChunkRegistry(redis_client, namespace="iso-one")
    two = ChunkRegistry(redis_client, namespace="iso-two")
    chunk = make_chunk([42])
    one.put(chunk)
    one.activate("default", chunk.hash)
    assert two.list_chunks() == [] and two.active("default") == []
    assert not two.exists(chunk.hash)
    with pytest.raises(InvalidInput):
        ChunkRegistry(redis_client, namespace="bad:name")


def test_activation_checked_against_a_stale_list_changes_nothing(reg):
    a, b = make_chunk([1]), make_chunk([2])
    reg.put(a)
    reg.put(b)
    reg.activate("ctx", a.hash, expected=[])
    with pytest.raises(ConcurrentChange):
        reg.activate("ctx", b.hash, expected=[])  # checked before `a` came in
    assert reg.active("ctx") == [a.hash]
    assert reg.activate("ctx", b.hash, expected=[a.hash])
    assert reg.active("ctx") == [a.hash, b.hash]


def test_several_chunks_are_activated_in_one_write_all_or_none(reg):
    a, b, c = make_chunk([1]), make_chunk([2]), make_chunk([3])
    for chunk in (a, b, c):
        reg.put(chunk)
    reg.activate("ctx", b.hash)
    with pytest.raises(ChunkNotFound, match=fake_hash("beef")):
        reg.activate_many("ctx", [a.hash, fake_hash("beef"), c.hash])
    with pytest.raises(ConcurrentChange):
        reg.activate_many("ctx", [a.hash, c.hash], expected=[])  # checked before `b` came in
    assert reg.active("ctx") == [b.hash]
    assert reg.activate_many("ctx", [c.hash, b.hash, a.hash, c.hash], expected=[b.hash]) == 2
    assert reg.active("ctx") == [b.hash, c.hash, a.hash]
    assert reg.activate_many("new-ctx", [a.hash]) == 1 and "new-ctx" in reg.contexts()
    assert reg.activate_many("ctx", [a.hash]) == 0


def test_several_chunks_are_deactivated_in_one_write_all_or_none(reg):
    a, b, c = make_chunk([1]), make_chunk([2]), make_chunk([3])
    for chunk in (a, b, c):
        reg.put(chunk)
    reg.activate_many("ctx", [a.hash, b.hash, c.hash])
    reg.set_tiers({a.hash: "cpu"})
    with pytest.raises(ChunkNotFound, match=fake_hash("beef")):
        reg.find_and_deactivate_many([a.hash, fake_hash("beef")], "ctx")
    assert reg.active("ctx") == [a.hash, b.hash, c.hash]
    gone = reg.find_and_deactivate_many([c.hash[:10], a.hash, c.hash], "ctx")
    assert [(g.hash, g.tier, g.is_active) for g in gone] == [
        (c.hash, "disk", False),  # its tier never recorded: its KV is in its file
        (a.hash, "cpu", False),
    ]
    assert reg.active("ctx") == [b.hash]
    assert reg.find_and_deactivate(c.hash, "ctx").hash == c.hash  # not active: stays so
