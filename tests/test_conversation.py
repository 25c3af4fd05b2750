"""ContextManager.chat: a conversation sent whole with each request, kept as chunks."""

from __future__ import annotations

import contextlib
import threading

import pytest

from kvchunks.common import ChunkNotFound, ContextWindowExceeded, InvalidInput
from kvchunks.engine import SamplingParams
from kvchunks.service.context_manager import ContextManager

GREEDY = SamplingParams(temperature=0, max_tokens=12)
DOC = "The ferry to Vaxholm leaves from Strömkajen at 9:15 and takes seventy minutes."
OTHER = "The museum by the harbour opens at ten and closes at five, except on Mondays."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_a_resent_conversation_computes_only_its_new_message(make_cm):
    cm = make_cm("chat")
    doc = cm.add_chunk(DOC)
    cm.activate_chunk(doc.hash)
    first = cm.chat([user("When does the ferry leave?")], GREEDY)
    assert first.prompt_chunk.parent_chunks == [doc.hash] and not first.prompt_reused
    history = [user("When does the ferry leave?"), {"role": "assistant", "content": first.text}]
    second = cm.chat([*history, user("How long does it take?")], GREEDY)
    # The first turn's prompt and answer are its chunks again: nothing of them is computed.
    turn = first.prompt_chunk.token_count + first.output_chunk.token_count
    assert second.prompt_chunk.parent_chunks == [
        doc.hash,
        first.prompt_chunk.hash,
        first.output_chunk.hash,
    ]
    assert second.tokens_reused == doc.token_count + turn and second.tokens_recomputed == 0
    assert [c.hash for c in cm.context().chunks] == [doc.hash]  # the active set is unchanged
    # The same chunks active in another context answer the same, through generate.
    other = cm.with_context("chat-oracle")
    for chunk in (doc, first.prompt_chunk, first.output_chunk):
        other.activate_chunk(chunk.hash)
    expected = other.generate("How long does it take?", GREEDY)
    assert second.text == expected.text and second.output_chunk.hash == expected.output_chunk.hash


def test_under_auto_activate_a_chat_of_one_message_at_a_time_goes_on(make_cm):
    """As the web page sends it: one new message per request, the context's auto_activate
    on. Each exchange joins the active chunks, so the next one reads it, as generate's do;
    with store=False nothing is kept, so nothing joins."""
    cm = make_cm("chat-auto", auto_activate=True)
    doc = cm.add_chunk(DOC)
    cm.activate_chunk(doc.hash)
    first = cm.chat([user("When does the ferry leave?")], GREEDY)
    exchange = [doc.hash, first.prompt_chunk.hash, first.output_chunk.hash]
    assert [c.hash for c in cm.context().chunks] == exchange
    assert first.output_chunk.is_active
    cm.chat([user("How long does it take?")], GREEDY, store=False)
    assert [c.hash for c in cm.context().chunks] == exchange
    second = cm.chat([user("How long does it take?")], GREEDY)
    assert second.prompt_chunk.parent_chunks == exchange


def test_request_chunks_and_messages_without_storing(make_cm):
    cm = make_cm("chat-nostore")
    doc = cm.add_chunk(DOC)
    before = {c.hash for c in cm.list_chunks()}
    messages = [
        {"role": "system", "content": "Answer in one short sentence."},
        user("Where does the ferry leave from?"),
    ]
    answer = cm.chat(messages, GREEDY, chunks=[doc.hash[:10]], store=False)
    assert answer.text and answer.output_chunks == []
    assert answer.tokens_recomputed > 0  # the system message was computed for this call
    assert {c.hash for c in cm.list_chunks()} == before and cm.context().chunks == []
    kept = cm.chat(messages, GREEDY, chunks=[doc.hash])
    assert kept.text == answer.text and kept.prompt_chunk.parent_chunks[0] == doc.hash
    assert len({c.hash for c in cm.list_chunks()} - before) == 3  # system, prompt, answer


def test_request_chunks_already_active_or_named_twice_are_read_once(make_cm):
    cm = make_cm("chat-once")
    doc, other = cm.add_chunk(DOC), cm.add_chunk("The museum is closed on Mondays.")
    cm.activate_chunk(doc.hash)
    question = [user("When does the ferry leave?")]
    once = cm.chat(question, GREEDY, chunks=[other.hash], store=False)
    again = cm.chat(question, GREEDY, chunks=[doc.hash[:8], other.hash, other.hash], store=False)
    assert again.text == once.text
    read = doc.token_count + other.token_count  # each once (realign recomputes some the first time)
    assert once.tokens_reused + once.tokens_recomputed == read
    assert again.tokens_reused + again.tokens_recomputed == read
    kept = cm.chat(question, GREEDY, chunks=[other.hash, doc.hash])
    assert kept.prompt_chunk.parent_chunks == [doc.hash, other.hash]


def test_without_storing_a_chunk_another_request_took_up_meanwhile_stays(make_cm):
    """store=False takes back what the call made, but not a chunk that, while the answer was
    being generated, another request activated (or computed a chunk after): it is no longer
    the call's alone."""
    cm = make_cm("chat-shared")
    other = cm.with_context("chat-shared-other")
    before = {c.hash for c in cm.list_chunks()}
    system = {"role": "system", "content": "Answer in one short sentence, please."}
    taken_up = []

    def meanwhile(_text: str) -> None:
        if not taken_up:  # the messages are stored by now; the answer is being generated
            [made] = [c for c in other.list_chunks() if c.hash not in before and c.role == "system"]
            taken_up.append(other.activate_chunk(made.hash).hash)

    answer = cm.chat([system, user("Where is Vaxholm?")], GREEDY, on_text=meanwhile, store=False)
    assert answer.text and taken_up
    assert {c.hash for c in cm.list_chunks()} - before == set(taken_up)  # the prompt went
    assert [c.hash for c in other.context().chunks] == taken_up


@contextlib.contextmanager
def answering_while_taking_back(monkeypatch, maker, answer, resume_after_take_back=False):
    """While the block runs, the first take-back of `maker` starts `answer(on_text)` on a
    thread and takes back once that answer's text streams; the answer then waits in its
    on_text until the take-back is done (`resume_after_take_back`) or else the block ends.
    Yields the list the answer's result lands in (empty if it raised)."""
    take_back = maker.take_back
    running, go_on, answered, threads = threading.Event(), threading.Event(), [], []

    def on_text(_text: str) -> None:
        running.set()
        go_on.wait(timeout=120)

    def take_back_while_another_answers(chunks: list) -> None:
        monkeypatch.setattr(maker, "take_back", take_back)
        threads.append(threading.Thread(target=lambda: answered.append(answer(on_text))))
        threads[0].start()
        assert running.wait(timeout=120)
        take_back(chunks)
        if resume_after_take_back:
            go_on.set()

    monkeypatch.setattr(maker, "take_back", take_back_while_another_answers)
    try:
        yield answered
    finally:
        go_on.set()
        for thread in threads:
            thread.join(timeout=120)


def test_without_storing_what_a_running_answer_found_stays_for_it(make_cm, monkeypatch):
    """store=False takes back what the call made only once no other call holds it: here an
    answer that found the call's message and prompt stored, running as they would go,
    keeps them and stores its answer after them."""
    cm = make_cm("chat-running")
    other = cm.with_context("chat-running-other")
    before = {c.hash for c in cm.list_chunks()}
    messages = [
        {"role": "system", "content": "Answer briefly, please."},
        user("Where is Sandhamn?"),
    ]

    def answer(on_text):
        return other.chat(messages, GREEDY, on_text=on_text)

    with answering_while_taking_back(
        monkeypatch, cm.store.maker, answer, resume_after_take_back=True
    ) as kept:
        dropped = cm.chat(messages, GREEDY, store=False)
    [answer] = kept  # before the fix: ChunkNotFound in the thread, its prompt gone
    assert dropped.text and answer.prompt_reused
    [system] = answer.prompt_chunk.parent_chunks
    made = {system, answer.prompt_chunk.hash, answer.output_chunk.hash}
    assert {c.hash for c in cm.list_chunks()} - before == made


def test_without_storing_what_a_running_answer_elsewhere_found_stays_for_it(make_cm, monkeypatch):
    """The same when the running answer is another process's (a worker of a cluster): here a
    second store on the same data directory, with its own maker and lock. The call that
    takes back ends first, while the other answer still runs."""
    cm = make_cm("chat-apart")
    elsewhere = make_cm("chat-apart-other")  # another ChunkStore: shares only the registry
    before = {c.hash for c in cm.list_chunks()}
    messages = [
        {"role": "system", "content": "Answer briefly, please, and politely."},
        user("Where is Grinda?"),
    ]

    def answer(on_text):
        return elsewhere.chat(messages, GREEDY, on_text=on_text)

    with answering_while_taking_back(monkeypatch, cm.store.maker, answer) as kept:
        dropped = cm.chat(messages, GREEDY, store=False)  # ends, the other still answering
    [answer] = kept  # before holds were in the registry: ChunkNotFound in the thread
    assert dropped.text and answer.prompt_reused
    [system] = answer.prompt_chunk.parent_chunks
    made = {system, answer.prompt_chunk.hash, answer.output_chunk.hash}
    assert {c.hash for c in cm.list_chunks()} - before == made


def test_without_storing_a_chunk_another_call_read_goes_after_what_it_computed(
    make_cm, monkeypatch
):
    """Two calls that keep nothing, in two processes: the second reads the first's message
    as one of its `chunks` and finds its prompt stored. What both made goes when the last
    of them ends, the prompt before the message it was computed after."""
    cm = make_cm("chat-both")
    elsewhere = make_cm("chat-both-other")
    before = {c.hash for c in cm.list_chunks()}
    system = {"role": "system", "content": "Answer briefly, and name the island."}
    question = user("Where is Utö?")

    def answer(on_text):  # started once the first call's message is stored
        [made] = [c.hash for c in cm.list_chunks() if c.hash not in before and c.role == "system"]
        return elsewhere.chat([question], GREEDY, chunks=[made], on_text=on_text, store=False)

    with answering_while_taking_back(monkeypatch, cm.store.maker, answer) as answered:
        cm.chat([system, question], GREEDY, store=False)
    [answer] = answered
    assert answer.prompt_reused  # the first call's prompt, found stored
    assert {c.hash for c in cm.list_chunks()} == before  # the message did not stay behind
    assert cm.registry.held() == []


def test_without_storing_what_a_chunk_another_call_read_was_computed_after_goes_too(
    make_cm, monkeypatch
):
    """The same when the second call reads the first's prompt, computed after its message:
    the message goes too, once the prompt has gone."""
    cm = make_cm("chat-lineage")
    elsewhere = make_cm("chat-lineage-other")
    before = {c.hash for c in cm.list_chunks()}
    system = {"role": "system", "content": "Answer briefly, and name the harbour."}

    def answer(on_text):  # started once the first call's prompt is stored
        [prompt] = [c.hash for c in cm.list_chunks() if c.hash not in before and c.role == "user"]
        return elsewhere.chat(
            [user("And then?")], GREEDY, chunks=[prompt], on_text=on_text, store=False
        )

    with answering_while_taking_back(monkeypatch, cm.store.maker, answer) as answered:
        cm.chat([system, user("Where is Arholma?")], GREEDY, store=False)
    [answer] = answered
    assert answer.text
    # Before the call held the lineage of what it read: the message stayed behind.
    assert {c.hash for c in cm.list_chunks()} == before
    assert cm.registry.held() == []


def test_a_call_reading_a_chunk_whose_parent_was_deleted_leaves_no_hold(make_cm):
    """A chunk's record still names a parent deleted since: the call holds the lineage of
    what it reads, that parent's name too, and lets go of all of it."""
    cm = make_cm("held-orphan")
    note = cm.add_chunk("The lighthouse on Landsort is lit at dusk.")
    cm.activate_chunk(note.hash)
    asked = cm.generate("When is it lit?", GREEDY)
    cm.clear()
    cm.delete_chunk(note.hash)  # the prompt and answer computed after it stay
    cm.activate_chunk(asked.output_chunk.hash)
    again = cm.chat([user("Say it again.")], GREEDY, store=False)
    assert again.text and note.hash in asked.output_chunk.parent_chunks
    cm.generate("And once more?", GREEDY)
    assert cm.registry.held() == []


def test_a_calls_lineage_is_let_go_of_after_what_was_computed_after_it(make_store):
    """By provenance, not by the records' clocks (workers' may differ): here a parent whose
    record says it was made after its child is still let go of after it."""
    from kvchunks.service.chunks import Hold
    from kvchunks.store.chunk import ChunkRecord
    from kvchunks.store.hashing import content_hash

    store = make_store()

    def stored(tokens: list[int], parents: list[str], made: float) -> ChunkRecord:
        record = ChunkRecord(
            hash=content_hash([*tokens, len(parents)]),  # any 64 hex digits will do
            content_hash=content_hash(tokens),
            token_ids=tokens,
            parent_chunks=parents,
            created_at=made,
        )
        store.registry.put(record)
        return record

    parent = stored([5, 6], [], made=200.0)
    child = stored([7], [parent.hash], made=100.0)
    hold = Hold("lineage-order")
    store.maker.hold(hold, [child.hash])
    store.maker.hold_lineage(hold, store.registry.get_many([child.hash]))
    assert hold.hashes == [parent.hash, child.hash]  # let go of in reverse: the child first
    store.registry.let_go(hold.holder, hold.hashes[::-1])
    assert store.registry.held() == []


def test_a_generation_holds_the_active_chunks_it_reads(make_cm, monkeypatch):
    """A chunk a call keeping nothing made, active in another context when a generation
    there starts and deactivated by hand while it answers, stays for that generation, which
    stores its prompt after it; the call that made it ends first."""
    cm = make_cm("gen-held")
    other = cm.with_context("gen-held-other")
    before = {c.hash for c in cm.list_chunks()}
    system = {"role": "system", "content": "Answer briefly, and name the skerry."}
    read = []

    def answer(on_text):  # started once the first call's message is stored
        [made] = [c.hash for c in cm.list_chunks() if c.hash not in before and c.role == "system"]
        other.activate_chunk(made)
        read.append(made)

        def deactivated_meanwhile(text: str) -> None:
            if other.context().chunks:
                other.deactivate_chunk(made)
            on_text(text)

        return other.generate("Which skerry?", GREEDY, on_text=deactivated_meanwhile)

    with answering_while_taking_back(monkeypatch, cm.store.maker, answer) as answered:
        cm.chat([system, user("Where is Gillöga?")], GREEDY, store=False)
    [answer] = answered
    assert answer.prompt_chunk.parent_chunks == read
    # Before generate held them: the message went, its prompt stored after a deleted chunk.
    made = {*read, answer.prompt_chunk.hash, answer.output_chunk.hash}
    assert {c.hash for c in cm.list_chunks()} - before == made
    assert cm.registry.held() == []


def test_a_worker_started_again_lets_go_of_what_its_last_life_held(make_store):
    """Holds are named after the store: a worker's store, made again after a crash under
    the same name, lets go of its dead calls' holds, newest chunk first (taking back what
    they marked: a chunk others were computed after goes only once they are gone), and
    leaves the holds of other stores that are alive alone."""
    first = make_store(holder_name="worker-7")
    cm = ContextManager(store=first)
    note = cm.add_chunk("The ferry to Sandhamn leaves at noon.")
    cm.activate_chunk(note.hash)
    answer = cm.generate("When does it leave?", GREEDY)
    cm.clear()
    other = cm.add_chunk("The ferry to Möja leaves at one.")
    made = [note, answer.prompt_chunk, *answer.output_chunks]  # each computed after the last
    registry = first.registry
    registry.hold("worker-7:dead-call", [c.hash for c in [*made, other]])
    registry.renew_lease("worker-70", 600)  # another worker, alive, whose call still runs
    registry.hold("worker-70:running", [other.hash])
    for chunk in [*made, other]:
        assert not registry.take_back(chunk.hash)  # marked, to go with the last hold
    # One more the dead worker let go of but did not live to take back.
    orphan = cm.add_chunk("The ferry to Utö leaves at two.")
    registry.hold("worker-7:dying-call", [orphan.hash])
    assert not registry.take_back(orphan.hash)
    assert registry.let_go("worker-7:dying-call", [orphan.hash]) == orphan.hash
    made.append(orphan)
    again = make_store(holder_name="worker-7", restore=False)
    again.maker.let_go_of_earlier_life()
    assert registry.missing([c.hash for c in made]) == [c.hash for c in made]
    assert registry.exists(other.hash) and registry.held() == [other.hash]
    assert registry.let_go("worker-70:running", [other.hash]) == other.hash
    assert registry.take_back(other.hash, marked=True) and registry.held() == []


def test_a_take_back_that_fails_lets_go_of_the_calls_other_holds_first(make_store, monkeypatch):
    store = make_store()
    cm = ContextManager(store=store)
    chunks = [cm.add_chunk(f"Holds note {i}: the tide turns at {i} o'clock.") for i in (4, 5)]
    maker, registry = store.maker, store.registry

    def failing(chunk, marked=False):
        raise OSError(f"cannot remove the file of {chunk.hash[:12]}")

    monkeypatch.setattr(maker, "_take_back_one", failing)
    # The first failure is raised: the newest chunk's.
    with pytest.raises(OSError, match=chunks[1].hash[:12]), maker.holding() as hold:
        maker.hold(hold, [c.hash for c in chunks])
        for chunk in chunks:
            assert not registry.take_back(chunk.hash)  # marked
    assert registry.holds_of([maker.holder_name]) == []  # every hold let go, though both failed
    monkeypatch.undo()
    for chunk in chunks:
        maker._take_back_one(chunk, marked=True)
    hashes = [c.hash for c in chunks]
    assert registry.held() == [] and registry.missing(hashes) == hashes


def test_a_document_loaded_while_a_call_without_storing_holds_it_stays(make_cm):
    """A document loaded while a store=False call holds the same chunk (its system message)
    is the loader's: the call's take-back leaves it."""
    cm = make_cm("chat-load")
    other = cm.with_context("chat-load-other")
    text = "Sandhamn lies in the outer archipelago; boats leave from Strandvägen."
    before = {c.hash for c in cm.list_chunks()}
    loaded = []

    def meanwhile(_text: str) -> None:
        if not loaded:
            loaded.append(other.add_chunk(text, role="system"))

    cm.chat(
        [{"role": "system", "content": text}, user("Where is it?")],
        GREEDY,
        on_text=meanwhile,
        store=False,
    )
    [doc] = loaded
    assert cm.get_chunk(doc.hash).text == text  # before the fix: ChunkNotFound
    assert {c.hash for c in cm.list_chunks()} - before == {doc.hash}


def test_a_developer_message_is_a_system_message(make_cm):
    """OpenAI's newer name for the system message: the same chunk, the same answer."""
    cm = make_cm("chat-developer")
    asked = [{"role": "system", "content": DOC}, user("When does the ferry leave?")]
    system = cm.chat(asked, GREEDY)
    developer = cm.chat([{"role": "developer", "content": DOC}, asked[1]], GREEDY)
    assert developer.prompt_chunk.parent_chunks == system.prompt_chunk.parent_chunks
    assert developer.text == system.text and developer.prompt_reused


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], InvalidInput),
        ([{"role": "assistant", "content": "Hi."}], InvalidInput),
        ([{"role": "tool", "content": "x"}, user("Hi?")], InvalidInput),
        ([user("   ")], InvalidInput),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], InvalidInput),
        ([user("word " * 9000)], ContextWindowExceeded),
    ],
)
def test_bad_conversations_are_refused_and_change_nothing(make_cm, messages, error):
    cm = make_cm("chat-bad")
    before = cm.list_chunks()
    with pytest.raises(error):
        cm.chat(messages, GREEDY)
    with pytest.raises(ChunkNotFound):
        cm.chat([user("Hi?")], GREEDY, chunks=["0000aaaa"])
    assert cm.list_chunks() == before


class Stopped(Exception):
    pass


def stopped_call_state(cm: ContextManager) -> tuple:
    """Chunks, holds, and pool blocks free or in a composition: a composition made whole
    before the call stopped is kept (derived KV, used by the next call over those chunks)."""
    tiers = cm.store.tiers
    composed = sum(len(c.segment.blocks) for c in tiers.compositions.values())
    free = tiers.model.llm.block_manager.num_free
    return {c.hash for c in cm.list_chunks()}, cm.store.registry.held(), free + composed


@pytest.mark.parametrize("mode", ["realign", "exact"])
def test_a_call_stopped_before_its_first_token_leaves_nothing_behind(make_cm, tmp_path, mode):
    """check_stop raising between layers before the first token (composing the documents,
    computing the earlier turn, the prompt) ends the call: no chunk, pool block or hold
    stays, and the call asked again (over the composition a stop in the prompt left) answers
    as if it had never started."""
    from kvchunks.service.audit import violations

    conversation = [
        user("When does the ferry leave?"),
        {"role": "assistant", "content": "At 9:15."},
    ]
    conversation.append(user("How long does it take?"))

    def with_documents(cm: ContextManager) -> ContextManager:
        for text in (DOC, OTHER):
            cm.activate_chunk(cm.add_chunk(text).hash)
        return cm

    # How many times check_stop runs before the first token, where nothing was computed yet.
    fresh, calls, first_text_at = with_documents(make_cm("stop", at=tmp_path / "fresh")), [], []
    expected = fresh.chat(
        conversation,
        GREEDY,
        mode=mode,
        on_text=lambda _: first_text_at.append(len(calls)),
        check_stop=lambda: calls.append(1),
    )
    fresh.store.tiers.release_all()  # the pool's blocks are all the stopped calls' store's
    before_first_token = first_text_at[0] - 1  # its last call came after the first token
    assert before_first_token > 3 * len(fresh.store.model.llm.runner.model.layers)
    cm = with_documents(make_cm("stop"))
    before, tiers = stopped_call_state(cm), cm.store.tiers
    for stop_at in (1, before_first_token // 2, before_first_token):
        calls.clear()

        def check_stop(stop_at: int = stop_at) -> None:
            calls.append(1)
            if len(calls) == stop_at:
                raise Stopped

        with pytest.raises(Stopped):
            cm.chat(conversation, GREEDY, mode=mode, check_stop=check_stop)
        assert stopped_call_state(cm) == before, stop_at
        assert stop_at > 1 or not tiers.compositions  # none made in part
        if stop_at < before_first_token:  # the next stop finds the same work ahead of it
            with tiers.lock:
                for key in list(tiers.compositions):
                    tiers.drop_composition(key)
        assert violations(cm.store.tiers) == []
    answer = cm.chat(conversation, GREEDY, mode=mode)
    assert answer.text == expected.text and answer.tokens_recomputed == expected.tokens_recomputed
