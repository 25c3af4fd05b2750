"""Generation controls: the penalties against reference implementations of their rules, stop
strings that end the answer and its chunk before them, the options of every way to generate
(command line, chat /set, HTTP, Ray client), and dtypes that never mix."""

from __future__ import annotations

import json

import pytest
import ray_fixtures
import torch
from click.testing import CliRunner
from reference import hf_generate, hf_kv
from transformers import RepetitionPenaltyLogitsProcessor

from kvchunks.cli.chat import Chat
from kvchunks.cli.main import cli
from kvchunks.cli.state import State
from kvchunks.common import DtypeMismatch, InvalidInput
from kvchunks.engine import SamplingParams, sampler
from kvchunks.engine.sampler import penalize, sample
from kvchunks.engine.sequence import Sequence
from kvchunks.engine.stop_strings import held_back
from kvchunks.store.kv_file import kv_path, read_kv_header

ray_cluster, ray_service = ray_fixtures.ray_cluster, ray_fixtures.ray_service  # used by name

VOCAB = 50
DOC = "Ferry notes: the night ferry leaves Brekke harbour at eleven and reaches Varden at two."
PENALTIES = {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.25}
OPTIONS = ["--repetition-penalty", "1.3", "--presence-penalty", "0.5"]
OPTIONS += ["--frequency-penalty", "0.25", "--stop", "zebra"]
HI = [{"role": "user", "content": "Hi"}]


def logits_for(rows: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(3)) * 4


def sequence(prompt: list[int], answer: list[int], context=(), **params) -> Sequence:
    seq = Sequence(prompt, SamplingParams(**params), context_token_ids=context)
    seq.token_ids += answer
    return seq


# -- the rules ----------------------------------------------------------------------------------


def test_repetition_penalty_is_hf_processor_over_every_token_seen():
    seqs = [
        sequence([1, 2, 3], [4, 4, 9], context=[7, 8], repetition_penalty=1.5),
        sequence([5, 6], [6, 11], repetition_penalty=0.7),  # below 1 favours repeats
        sequence([1, 2], [3], repetition_penalty=1.0),  # off in the same batch
    ]
    logits = logits_for(len(seqs))
    ours = penalize(logits, seqs)
    for row, seq in enumerate(seqs):
        seen = torch.tensor([[*seq.context_token_ids, *seq.token_ids]])
        processor = RepetitionPenaltyLogitsProcessor(seq.params.repetition_penalty)
        expected = processor(seen, logits[row : row + 1].clone())[0]
        torch.testing.assert_close(ours[row], expected, rtol=0, atol=1e-6)
    assert not torch.equal(ours[0], logits[0]) and torch.equal(ours[2], logits[2])


def openai_reference(logits: torch.Tensor, answer: list[int], presence: float, frequency: float):
    """OpenAI's formula, token by token: mu[j] - c[j] * frequency - [c[j] > 0] * presence,
    c[j] counted over the answer's tokens."""
    out = logits.clone()
    for token in set(answer):
        count = answer.count(token)
        out[token] -= count * frequency + presence
    return out


def test_presence_and_frequency_follow_openai_over_the_answer_only():
    seqs = [
        sequence([20, 21], [4, 4, 4, 9], context=[30], presence_penalty=0.5, frequency_penalty=0.3),
        sequence([4, 9], [12], presence_penalty=-1.0, frequency_penalty=2.0),
        sequence([40], [4, 9], presence_penalty=0.0, frequency_penalty=0.0),
    ]
    logits = logits_for(len(seqs))
    ours = penalize(logits, seqs)
    for row, seq in enumerate(seqs):
        p = seq.params
        expected = openai_reference(
            logits[row], seq.completion_token_ids, p.presence_penalty, p.frequency_penalty
        )
        torch.testing.assert_close(ours[row], expected, rtol=0, atol=1e-6)
    assert ours[0, 20] == logits[0, 20] and ours[0, 30] == logits[0, 30]  # prompt, context
    assert ours[1, 4] == logits[1, 4]  # in the prompt only: not counted


def test_default_decoding_never_computes_penalties(monkeypatch):
    def refuse(*_):
        raise AssertionError("penalties computed for a batch that has none")

    monkeypatch.setattr(sampler, "penalize", refuse)
    seqs = [sequence([1, 2], [3], temperature=0), sequence([4], [], temperature=0.7, seed=1)]
    assert len(sample(logits_for(2), seqs)) == 2
    seqs.append(sequence([5], [], repetition_penalty=1.1))
    with pytest.raises(AssertionError, match="penalties computed"):
        sample(logits_for(3), seqs)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0 and finite, got 0.0"),
        ("repetition_penalty", float("nan"), "repetition_penalty must be > 0"),
        ("repetition_penalty", float("inf"), "repetition_penalty must be > 0 and finite"),
        ("temperature", float("inf"), "temperature must be >= 0 and finite, got inf"),
        ("seed", 2**64, "seed must be a 64-bit integer"),
        ("seed", -(2**63) - 1, "seed must be a 64-bit integer"),
        ("presence_penalty", 2.5, "presence_penalty must be between -2 and 2, got 2.5"),
        ("frequency_penalty", -2.01, "frequency_penalty must be between -2 and 2, got -2.01"),
        ("max_tokens", 2.5, "max_tokens must be a whole number, got 2.5"),
        ("max_tokens", True, "max_tokens must be a whole number, got True"),
        ("top_k", "5", "top_k must be a whole number, got '5'"),
        ("seed", 1.5, "seed must be a whole number or None, got 1.5"),
        ("temperature", None, "temperature must be a number, got None"),
        ("ignore_eos", "no", "ignore_eos must be True or False, got 'no'"),
        ("stop_token_ids", [-1], "stop_token_ids must be a list of token ids"),
        # JSON's "\ud800": refused before the answer, whose record could not hold it.
        ("stop", ["a\ud800"], "a stop string holds a lone surrogate"),
    ],
)
def test_sampling_values_out_of_range_are_refused(name, value, message):
    with pytest.raises(InvalidInput, match=message) as info:
        SamplingParams(**{name: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("max_tokens", 0, "max_tokens must be >= 1"),
        ("stop", "H", "stop must be a list of non-empty strings"),
        ("seed", "x", "seed must be a whole number"),
    ],
)
def test_sampling_values_set_after_the_params_were_made_are_refused(make_cm, name, value, message):
    """Params are a plain dataclass: a field set later is checked when a call takes them."""
    cm = make_cm("params-set-later")
    params = SamplingParams(temperature=0, max_tokens=4)
    setattr(params, name, value)
    before = [c.hash for c in cm.list_chunks()]
    for call in (
        lambda: cm.generate("Hi", params),
        lambda: cm.chat([{"role": "user", "content": "Hi"}], params),
    ):
        with pytest.raises(InvalidInput, match=message):
            call()
    assert [c.hash for c in cm.list_chunks()] == before


def test_greedy_with_repetition_penalty_equals_hf_generate(llm, hf_model):
    ids = llm.encode([{"role": "user", "content": "Write the word cat ten times."}])
    for penalty in (1.0, 1.4):
        params = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=penalty)
        [out] = llm.generate([ids], params)
        assert out.token_ids == hf_generate(hf_model, ids, 24, repetition_penalty=penalty)
        if penalty == 1.0:
            plain = out.token_ids
    assert out.token_ids != plain  # the penalty changed the answer: the test can tell


def test_penalties_over_chunks_count_the_opening_and_the_chunks_as_hf_does(make_cm, hf_model):
    """HF's processor penalizes every token of its input: over chunks, that is the opening,
    the active chunks and the prompt, all of which the model reads."""
    cm = make_cm(mode="exact")
    doc = cm.add_chunk("You are named Ada. Ada is a helpful assistant trained by Face.")
    cm.activate_chunk(doc.hash)
    params = SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.5)
    g = cm.generate("Who are you and who trained you?", params)
    ids = cm.store.model.chat.opening + doc.token_ids + g.prompt_chunk.token_ids
    expected = hf_generate(hf_model, ids, 16, repetition_penalty=1.5)
    assert g.token_ids == expected[: len(g.token_ids)] and len(g.token_ids) > 4


# -- stop strings -------------------------------------------------------------------------------


def test_an_ending_that_may_begin_a_stop_string_is_held_back_down_to_one_character():
    assert held_back("Hello\n", ["\n\n"]) == "Hello"  # shown, it could not be taken back
    assert held_back("ab", ["b!"]) == "a"
    assert held_back("Hello wor", ["world", "x"]) == "Hello "
    assert held_back("Hello", ["\n\n"]) == "Hello"


def test_stop_string_ends_the_answer_and_its_chunk_before_it(make_cm):
    cm = make_cm()
    question = "Name three colours of the rainbow, one per line."
    free = cm.generate(question, SamplingParams(temperature=0, max_tokens=40))
    words = free.text.split()
    stop = words[len(words) // 2]
    before = free.text[: free.text.index(stop)]
    shown: list[str] = []
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
    cut = cm.generate(question, params, on_text=shown.append)
    assert cut.finish_reason == "stop" and cut.text == before
    assert "".join(shown) == before  # the stop string was never streamed
    chunk = cut.output_chunk
    assert stop not in chunk.text and free.text.startswith(cm.store.model.decode(cut.token_ids))
    assert chunk.token_ids[: len(cut.token_ids)] == cut.token_ids
    assert chunk.token_ids[len(cut.token_ids) :] == cm.store.model.chat.close_answer(cut.token_ids)
    assert chunk.generation_params["stop"] == [stop]


def test_ctrl_c_keeps_the_answer_as_shown_with_the_kv_hf_computes(make_cm, hf_model):
    """The last token shown was sampled but not computed when Ctrl-C came: the kept answer
    still ends with it, and its KV is the model's over the whole conversation."""
    cm = make_cm()
    shown: list[str] = []

    def stopped(piece: str) -> None:
        shown.append(piece)
        if len(shown) == 4:
            raise KeyboardInterrupt

    params = SamplingParams(temperature=0, max_tokens=40)
    g = cm.generate("Count from one to twenty, in words.", params, on_text=stopped)
    answer = g.output_chunk
    assert g.interrupted and g.text == "".join(shown)
    assert answer.token_ids == g.token_ids and answer.text == g.text
    ids = [*cm.store.model.chat.opening, *g.prompt_chunk.token_ids, *answer.token_ids]
    k, v = cm.store.model.llm.read_kv(cm.store.composer.segments(answer))
    n = answer.token_count
    for layer, (hf_k, hf_v) in enumerate(hf_kv(hf_model, ids)):
        for ours, ref in ((k[layer], hf_k), (v[layer], hf_v)):
            hf_tail = ref[0, :, -n:].transpose(0, 1)  # [tokens, kv_heads, head_dim]
            assert (ours - hf_tail).abs().max().item() <= 1e-4, layer


# -- every way to generate ----------------------------------------------------------------------


class OpenState(State):
    """Keeps its manager between invocations."""

    def close(self) -> None:
        pass


def kvchunks(state: State, *args: str, status: int = 0):
    result = CliRunner().invoke(cli, list(args), obj=state, env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == status, (args, result.output, result.exception)
    return result


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_options_and_chat_set_reach_the_engine(make_cm):
    state = OpenState(_manager=make_cm())
    made = json.loads(
        kvchunks(state, "generate", "Hi", "--max-tokens", "6", *OPTIONS, "--json").stdout
    )
    params = made["output_chunk"]["generation_params"]
    assert {k: params[k] for k in PENALTIES} == PENALTIES and params["stop"] == ["zebra"]
    before = state.manager.list_chunks()
    bad = kvchunks(state, "generate", "Hi", "--presence-penalty", "3", status=1)
    assert "presence_penalty must be between -2 and 2, got 3.0" in one_line_error(bad)
    assert state.manager.list_chunks() == before

    chat = Chat(state)
    chat.handle("/set " + " ".join(["--max-tokens", "5", *OPTIONS]))
    chat.handle("/set --repetition-penalty 0")  # refused: the settings stay
    chat.handle("Hello there")
    params = state.manager.last_generation.output_chunk.generation_params
    assert {k: params[k] for k in PENALTIES} == PENALTIES and params["max_tokens"] == 5
    assert params["temperature"] == 0.0  # the command line's default, not SamplingParams'
    chat.handle("/set --reset")
    assert state.sampling == {}


def test_http_fields_reach_the_engine_and_bad_values_are_400(served):
    with served.http() as http:
        body = {"max_tokens": 5, **PENALTIES}
        reply = http.post("/v1/completions", json={**body, "prompt": "Say hi."})
        assert reply.status_code == 200, reply.text
        output = served.cm.get_chunk(reply.json()["kvchunks"]["output_chunk"])
        assert {k: output.generation_params[k] for k in PENALTIES} == PENALTIES
        count = len(served.cm.list_chunks())
        for field, value in (("presence_penalty", 2.5), ("repetition_penalty", -1)):
            bad = http.post("/v1/chat/completions", json={**body, field: value, "messages": HI})
            assert bad.status_code == 400, bad.text
            assert field in bad.json()["error"]["message"]
        assert len(served.cm.list_chunks()) == count


def test_ray_client_forwards_the_controls(ray_service):
    from kvchunks.actors.client import connect

    client = connect("auto", "controls")
    params = SamplingParams(temperature=0, max_tokens=5, stop=["zebra"], **PENALTIES)
    made = client.generate("Say hi.", params)
    assert made.output_chunk.generation_params == {**params.to_dict(), "mode": made.mode}


# -- dtypes -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16(tmp_path_factory, model_path):
    """A command-line state that loads the model with --dtype bfloat16 (once)."""
    state = OpenState(model=str(model_path), home=tmp_path_factory.mktemp("bf16"))
    yield state
    State.close(state)


def test_bfloat16_end_to_end_and_never_mixed_with_float32(bf16, make_store, tmp_path):
    from kvchunks.service.context_manager import ContextManager

    doc = tmp_path / "ferry.txt"
    doc.write_text(DOC)
    f32 = ContextManager(store=make_store(at=bf16.home))
    a = f32.load_file(doc)
    [b] = json.loads(
        kvchunks(bf16, "--dtype", "bfloat16", "load", str(doc), "--activate", "--json").stdout
    )
    assert bf16.manager.store.model.engine_config.dtype == "bfloat16"
    assert b["hash"] != a.hash and b["token_count"] == a.token_count  # same tokens, dtype
    assert b["metadata"]["dtype"] == "bfloat16" and a.metadata["dtype"] == "float32"
    answer = json.loads(
        kvchunks(
            bf16, "generate", "When does the ferry leave?", "--max-tokens", "8", "--json"
        ).stdout
    )
    assert answer["text"].strip() and answer["output_chunk"]["metadata"]["dtype"] == "bfloat16"

    context = bf16.manager.context().to_json()
    for command in ("activate", "populate"):  # the record's dtype; the KV file's
        line = one_line_error(kvchunks(bf16, command, a.hash[:12], status=1))
        assert "computed in float32 and this model runs in bfloat16" in line
        assert "--dtype float32" in line
    assert bf16.manager.context().to_json() == context
    assert read_kv_header(kv_path(bf16.home, a.hash)).dtype == "float32"  # not recomputed
    exported = f32.export_chunk(a.hash, tmp_path / "a.kvc")
    line = one_line_error(kvchunks(bf16, "import", str(exported), status=1))
    assert "computed in float32 and this model runs in bfloat16" in line
    with pytest.raises(DtypeMismatch, match="computed in bfloat16 and this model runs in float32"):
        f32.activate_chunk(b["hash"])


def test_dtype_option_and_env_var_reach_the_state():
    seen = {}

    class Recording(OpenState):
        def close(self) -> None:
            seen["dtype"] = self.dtype

    kvchunks(Recording(), "--dtype", "float16", "context", "--help")
    assert seen["dtype"] == "float16"
    runner = CliRunner()
    env = {"KVCHUNKS_DTYPE": "bfloat16"}
    result = runner.invoke(cli, ["context", "--help"], obj=Recording(), env=env)
    assert result.exit_code == 0 and seen["dtype"] == "bfloat16"
    bad = runner.invoke(cli, ["--dtype", "int8", "context"], obj=Recording())
    assert bad.exit_code == 2 and "int8" in bad.stderr
