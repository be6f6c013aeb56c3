"""The serving engine (`earful.serve.SpeechLM`) on a tiny random listening LM and real FSDD audio:
conversations laid out right, concurrent callers batched without changing answers, each row ended
on its own (end of turn, stop sequence, its own budget, a cancelled caller), a bounded queue and
bounded request audio, bad requests refused with the field named.

The random model's greedy answer is newlines (so its text is empty): tests compare token ids, or
sample with a seed where they need text."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from conftest import FSDD_REC, Steps, fsdd_clip

from earful.audio import AudioError
from earful.serve.engine import DecodingOptions, RequestError, ServerBusy, SpeechLM


@pytest.fixture
def engine(tiny_lm, fsdd):
    model, processor = tiny_lm
    with SpeechLM(model, processor, name="tiny", max_batch_size=4, batch_wait_s=0.05, max_audio_seconds=5,
                  max_request_audio_seconds=8, max_clips=3) as lm:
        yield lm


def hi(options: DecodingOptions | None = None, text: str = "hi") -> tuple[list[dict], DecodingOptions]:
    return [{"role": "user", "content": text}], options or DecodingOptions(max_new_tokens=4)


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
    ask = lambda c: engine.generate([{"role": "user", "content": [{"audio": c}]}], DecodingOptions(max_new_tokens=6))  # noqa: E731
    alone = [ask(c) for c in clips]
    calls = []
    real_run = engine._run
    engine._run = lambda jobs: (calls.append(len(jobs)), real_run(jobs))[1]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, clips))
    assert [g.token_ids for g in together] == [g.token_ids for g in alone] and all(len(g.token_ids) == 6 for g in alone)
    assert max(calls) > 1 and sum(calls) == 8  # some went through generate() together


def test_answers_match_the_models_own_generate(engine):
    """The engine's greedy tokens are `model.generate`'s for the same conversation, clip features and all."""
    import torch

    from earful.models.processing import pad_features

    msgs = [{"role": "user", "content": ["Transcribe", {"audio": FSDD_REC / "3_jackson_0.wav"}]}]
    ids, features = engine._conversation(msgs)
    batch = {**engine.processor.pad([ids], padding_side="left"), **pad_features(features)}
    with torch.no_grad():
        expected = engine.model.generate(**batch, max_new_tokens=7, do_sample=False)[0, len(ids):].tolist()
    g = engine.generate(msgs, DecodingOptions(max_new_tokens=7))
    assert g.token_ids == expected and (g.completion_tokens, g.finish_reason, g.prompt_tokens) == (7, "length", len(ids))


def test_several_clips_in_one_conversation(engine):
    a, b = fsdd_clip("3_jackson_0.wav"), fsdd_clip("8_lucas_1.wav")
    msgs = [{"role": "user", "content": ["first", a]}, {"role": "assistant", "content": "three"}, {"role": "user", "content": ["then", b]}]
    g = engine.generate(msgs, DecodingOptions(max_new_tokens=5))
    assert (g.completion_tokens, g.finish_reason) == (5, "length")  # the random model never ends its turn this soon
    assert g.prompt_tokens > 20 and g.prompt_tokens == len(engine._conversation(msgs)[0])
    b_alone = engine.generate([{"role": "user", "content": [b]}], DecodingOptions(max_new_tokens=5))
    # Alongside another request in one batch, each answer is the same.
    with ThreadPoolExecutor(2) as pool:
        f1 = pool.submit(engine.generate, msgs, DecodingOptions(max_new_tokens=5))
        f2 = pool.submit(engine.generate, [{"role": "user", "content": [b]}], DecodingOptions(max_new_tokens=5))
        assert f1.result().token_ids == g.token_ids and f2.result().token_ids == b_alone.token_ids


def test_streaming_gives_the_same_text(engine):
    clip = FSDD_REC / "5_nicolas_2.wav"
    kwargs = {"audio": clip, "max_new_tokens": 24, "temperature": 1.0, "seed": 3}
    whole = engine.chat(**kwargs)
    pieces = list(engine.stream_chat(**kwargs))
    assert len(whole) > 20 and len(pieces) > 3  # sampled, the random model says something
    assert "".join(pieces) == whole


def test_seed_makes_sampling_repeatable(engine):
    sample = lambda seed: engine.chat("hi", max_new_tokens=16, temperature=1.0, seed=seed)  # noqa: E731
    first = sample(0)
    assert sample(0) == first and sample(1) != first
    with pytest.raises(RequestError, match="seed must be an integer, got 'x'"):
        engine.chat("hi", seed="x")


def test_a_tiny_temperature_decodes_greedily(engine):
    greedy = engine.generate(*hi(DecodingOptions(max_new_tokens=6)))
    for t in (1e-45, 1e-30, 0.005):  # logits / 1e-45 is inf: sampling gave NaN probabilities (a crash)
        assert engine.generate(*hi(DecodingOptions(max_new_tokens=6, temperature=t))).token_ids == greedy.token_ids


def test_stop_sequences_end_the_answer_before_them(engine):
    options = DecodingOptions(max_new_tokens=24, temperature=1.0, seed=5)
    full = engine.generate(*hi(options))
    stop = full.text[len(full.text) // 2:][:3]
    assert len(stop.strip()) == 3, full.text
    cut = engine.generate(*hi(DecodingOptions(max_new_tokens=24, temperature=1.0, seed=5, stop=("no such text", stop))))
    assert cut.text == full.text[: full.text.index(stop)].strip() and cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens
    streamed = "".join(engine.stream_chat("hi", max_new_tokens=24, temperature=1.0, seed=5, stop=[stop]))
    assert streamed == cut.text  # the stream never showed the start of the stop sequence either


def test_cancelling_stops_the_generation_at_the_next_token(engine):
    steps = Steps(engine.model)
    try:
        future, pieces = engine.submit(*hi(DecodingOptions(max_new_tokens=3000, temperature=1.0)), stream=True)
        reader = iter(pieces)
        assert next(reader)  # sampled, the random model says something at once
        reader.close()  # the reader leaves: the same as future.cancel()
        at_cancel = steps.n
        assert future.cancelled()
        quick = engine.generate(*hi(DecodingOptions(max_new_tokens=1)))
        assert quick.completion_tokens == 1
        assert steps.n - at_cancel < 30, f"{steps.n - at_cancel} more steps after the cancel (3000 without it)"
        assert engine.counts["cancelled"] == 1
        # A request cancelled while it waits never runs.
        long, _ = engine.submit(*hi(DecodingOptions(max_new_tokens=3000)))
        waiting, _ = engine.submit(*hi(DecodingOptions(max_new_tokens=5, temperature=1.0, seed=1)))  # runs alone, after `long`
        waiting.cancel()
        long.cancel()
        assert engine.generate(*hi(DecodingOptions(max_new_tokens=1))).completion_tokens == 1
        deadline = time.monotonic() + 10
        while engine.counts["cancelled"] < 3 and time.monotonic() < deadline:  # the worker drops `waiting` when it comes up
            time.sleep(0.01)
        assert engine.counts["cancelled"] == 3 and steps.n - at_cancel < 60
    finally:
        steps.handle.remove()


def test_each_row_ends_at_its_own_budget(engine):
    """A short request batched with a long one gets its answer at its own last token, not the batch's."""
    long, _ = engine.submit(*hi(DecodingOptions(max_new_tokens=2500)))
    short, _ = engine.submit(*hi(DecodingOptions(max_new_tokens=3), text="hello"))
    g = short.result(timeout=60)
    assert not long.done(), "the short answer came only when the long one was done"
    assert (g.completion_tokens, g.finish_reason) == (3, "length")
    assert long.result(timeout=120).completion_tokens == 2500


def test_the_queue_is_bounded(tiny_lm, fsdd):
    model, processor = tiny_lm
    with SpeechLM(model, processor, max_batch_size=1, max_queue=2) as lm:
        running, _ = lm.submit(*hi(DecodingOptions(max_new_tokens=3000)))
        while lm.queued:  # the worker has taken it
            time.sleep(0.005)
        waiting = [lm.submit(*hi())[0] for _ in range(2)]
        with pytest.raises(ServerBusy, match="2 requests are waiting") as busy:
            lm.submit(*hi())
        assert busy.value.retry_after_s >= 1 and lm.counts["busy"] == 1
        running.cancel()
        assert all(f.result(timeout=60).completion_tokens == 4 for f in waiting)
        assert lm.submit(*hi())[0].result(timeout=60).completion_tokens == 4  # room again


def test_request_audio_is_bounded_before_decoding(engine, tmp_path):
    clip = fsdd_clip("3_jackson_0.wav")
    long = np.tile(clip, int(np.ceil(4.5 * 16000 / len(clip))))[: int(4.5 * 16000)]  # under the 5 s a clip may last
    wav = tmp_path / "long.wav"
    sf.write(wav, long, 16000)
    garbage = b"RIFF not really a wave file at all" * 10
    # The limits come first: the undecodable clip is never read.
    with pytest.raises(RequestError, match="4 audio clips in one request, over the limit of 3"):
        engine.generate([{"role": "user", "content": [garbage, clip, clip, clip]}])
    for second in (wav.read_bytes(), wav, (long, 16000)):  # a header's length, a file's, an array's
        with pytest.raises(RequestError, match=r"9.0 s of audio in one request, over the limit of 8 s"):
            engine.generate([{"role": "user", "content": [garbage, wav.read_bytes(), second]}])
    with pytest.raises(AudioError, match=r"messages\[0\].content\[0\]: not an audio file"):  # within the limits: decoded, refused
        engine.generate([{"role": "user", "content": [garbage, wav]}])
    assert engine.generate([{"role": "user", "content": [wav, clip]}], DecodingOptions(max_new_tokens=2)).completion_tokens == 2


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


@pytest.mark.parametrize("options, match", [
    ({"temperature": 5}, "temperature must be a number between 0 and 2"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 5.5}, "max_new_tokens must be an integer"),
    ({"top_p": 0}, "top_p"),
    ({"stop": 5}, "stop must be a string or a list"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"stop": [""]}, "non-empty"),
    ({"seed": True}, "seed must be an integer"),
])
def test_bad_decoding_options(options, match):
    with pytest.raises(RequestError, match=match):
        DecodingOptions(**options)


def test_a_failing_generation_reaches_the_caller_and_the_engine_goes_on(engine, monkeypatch):
    before = engine.generate(*hi(DecodingOptions(max_new_tokens=3)))
    boom = RuntimeError("out of memory (simulated)")
    real = engine.model.generate
    monkeypatch.setattr(engine.model, "generate", lambda *a, **k: (_ for _ in ()).throw(boom))
    with pytest.raises(RuntimeError, match="simulated"):
        engine.chat("hello")
    with pytest.raises(RuntimeError, match="simulated"):
        list(engine.stream_chat("hello"))
    monkeypatch.setattr(engine.model, "generate", real)
    assert engine.generate(*hi(DecodingOptions(max_new_tokens=3))).token_ids == before.token_ids


def test_closing_with_a_reader_waiting_ends_its_stream(tiny_lm, fsdd):
    model, processor = tiny_lm
    lm = SpeechLM(model, processor)
    future, pieces = lm.submit(*hi(DecodingOptions(max_new_tokens=3000)), stream=True)
    reader = threading.Thread(target=lambda: list(pieces))
    reader.start()
    future.cancel()
    reader.join(timeout=30)
    lm.close()
    assert not reader.is_alive()


@pytest.mark.parametrize("pieces, spans", [
    (["Seven."], ["Seven."]),
    (["seven"], ["seven"]),  # no punctuation: spoken whole at the end
    (["The answer", " is seven. It was", " said twice! Then"], ["The answer is seven.", "It was said twice!", "Then"]),
    (["3.5 is", " not 4. "], ["3.5 is not 4."]),  # a decimal point is no sentence end
    (["Short, then more", " words, and a long enough clause; end"], ["Short, then more words,", "and a long enough clause;", "end"]),
    (["", " ", "Hi.", ""], ["Hi."]),
])
def test_a_streamed_answer_is_spoken_sentence_by_sentence(pieces, spans):
    from earful.serve.speech_out import sentences_as_decoded

    assert list(sentences_as_decoded(pieces)) == spans


def test_pcm16_is_24_khz_little_endian_and_clipped():
    from earful.serve.speech_out import pcm16_bytes

    wave = np.concatenate([np.full(22050, 0.5, np.float32), [2.0, -2.0]])  # 1 s at 22050 Hz, then out of range
    pcm = np.frombuffer(pcm16_bytes(wave, 22050), "<i2")
    assert abs(len(pcm) - 24002) <= 2 and pcm.max() == 32767 and pcm.min() >= -32767
    assert abs(int(np.median(pcm)) - 16384) < 20
