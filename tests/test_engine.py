"""The serving engine (`earful.serve.SpeechLM`) on a tiny random listening LM and real FSDD audio:
conversations laid out right, concurrent callers batched without changing answers, bad requests
refused with the field named."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import FSDD_REC, fsdd_clip

from earful.serve.engine import DecodingOptions, RequestError, SpeechLM


@pytest.fixture
def engine(tiny_lm, fsdd):
    model, processor = tiny_lm
    with SpeechLM(model, processor, name="tiny", max_batch_size=4, batch_wait_s=0.05, max_audio_seconds=5) as lm:
        yield lm


def test_conversation_ids_expand_each_clip_and_keep_the_system_prompt(tiny_lm):
    _, processor = tiny_lm
    processor.prompt_format.system_prompt = "You transcribe speech."
    token_id = processor.config.audio_token_id
    msgs = [{"role": "user", "content": "A <|audio|>"}, {"role": "assistant", "content": "seven"}, {"role": "user", "content": "B <|audio|>"}]
    ids = processor.conversation_ids(msgs, [3, 5])
    assert ids.count(token_id) == 8
    text = processor.tokenizer.decode(ids)
    assert text.index("You transcribe speech.") < text.index("A ") < text.index("seven") < text.index("B ")
    assert text.rstrip().endswith("assistant")  # ready for the answer
    with pytest.raises(ValueError, match="2 <|audio|> placeholders for 1 clips"):
        processor.conversation_ids(msgs, [3])
    # The single-prompt path is the same conversation with one user turn.
    assert processor.prompt_ids("A <|audio|>", 3) == processor.conversation_ids(msgs[:1], [3])


def test_concurrent_requests_are_batched_and_answer_as_alone(engine):
    clips = [FSDD_REC / f"{d}_george_{d}.wav" for d in range(8)]
    alone = [engine.chat(audio=c, max_new_tokens=6) for c in clips]
    calls = []
    real_run = engine._run
    engine._run = lambda jobs: (calls.append(len(jobs)), real_run(jobs))[1]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda c: engine.chat(audio=c, max_new_tokens=6), clips))
    assert together == alone
    assert max(calls) > 1 and sum(calls) == 8  # some went through generate() together


def test_several_clips_in_one_conversation(engine):
    a, b = fsdd_clip("3_jackson_0.wav"), fsdd_clip("8_lucas_1.wav")
    msgs = [{"role": "user", "content": ["first", a]}, {"role": "assistant", "content": "three"}, {"role": "user", "content": ["then", b]}]
    g = engine.generate(msgs, DecodingOptions(max_new_tokens=5))
    assert g.completion_tokens <= 5 and g.finish_reason in ("stop", "length")
    assert g.prompt_tokens > 20
    # Alongside another request in one batch, the answer is the same.
    with ThreadPoolExecutor(2) as pool:
        f1 = pool.submit(engine.generate, msgs, DecodingOptions(max_new_tokens=5))
        f2 = pool.submit(engine.chat, None, b, max_new_tokens=5)
        assert f1.result().text == g.text and isinstance(f2.result(), str)


def test_streaming_gives_the_same_text(engine):
    clip = FSDD_REC / "5_nicolas_2.wav"
    whole = engine.chat(audio=clip, max_new_tokens=8)
    assert "".join(engine.stream_chat(audio=clip, max_new_tokens=8)).strip() == whole


def test_audio_forms(engine):
    path = FSDD_REC / "2_george_4.wav"
    expected = engine.transcribe(path)
    wave8k = fsdd_clip("2_george_4.wav", 8000)
    assert engine.transcribe(str(path)) == expected
    assert engine.transcribe(path.read_bytes()) == expected
    assert engine.transcribe((wave8k, 8000)) == expected  # resampled as load_audio does


@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    ([{"role": "robot", "content": "hi"}], r"messages\[0\].role"),
    ([{"role": "user", "content": "say <|audio|>"}], "reserved"),
    ([{"role": "assistant", "content": [np.zeros(16000, np.float32)]}, {"role": "user", "content": "hi"}], "only user messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message"),
    ([{"role": "user", "content": [{"text": "x"}]}], r"content\[0\]"),
    ([{"role": "user", "content": [np.full(16000, np.nan, np.float32)]}], r"messages\[0\].content\[0\]"),
    ([{"role": "user", "content": [np.zeros(16000 * 6, np.float32)]}], "over the 5 s limit"),
    ([{"role": "user", "content": [np.zeros(10, np.float32)]}], "at least"),
])
def test_bad_requests_name_the_field(engine, messages, match):
    with pytest.raises(RequestError, match=match):
        engine.generate(messages)


def test_bad_decoding_options():
    with pytest.raises(RequestError, match="temperature"):
        DecodingOptions(temperature=5)
    with pytest.raises(RequestError, match="max_new_tokens"):
        DecodingOptions(max_new_tokens=0)


def test_a_failing_generation_reaches_the_caller_and_the_engine_goes_on(engine, monkeypatch):
    boom = RuntimeError("out of memory (simulated)")
    real = engine.model.generate
    monkeypatch.setattr(engine.model, "generate", lambda *a, **k: (_ for _ in ()).throw(boom))
    with pytest.raises(RuntimeError, match="simulated"):
        engine.chat("hello")
    with pytest.raises(RuntimeError, match="simulated"):
        list(engine.stream_chat("hello"))
    monkeypatch.setattr(engine.model, "generate", real)
    assert isinstance(engine.chat("hello", max_new_tokens=3), str)
