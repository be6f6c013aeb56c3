"""`earful serve` as a real server process on 127.0.0.1, driven by real clients.

The official `openai` client (chat with input_audio, streaming, transcription), raw HTTP and raw
sockets for every error status and abuse (bodies too big, stalled, left half-way; clients that
leave mid-answer; a full queue), urllib / requests / httpx on a 200 MB upload, a bounded load test,
headless Chromium through Playwright on the Gradio UI, and `earful.load()` in process.

Two servers: the CLI's, on the session's short run of recipes/digits.yaml (conftest.digits_model),
whose answers are checked against the same model's own answers through `earful.load()` (not
against which digits a model trained once for the test run happens to get right); and a tiny
random model's, served by uvicorn in this process, where a test needs long generations or access
to the engine (its queue, its cancellations).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import FSDD_REC, ROOT, Steps, tiny_configs, uvicorn_in_thread

from earful.serve.engine import DecodingOptions

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
MODEL = "digits"
# Recordings of the speakers the session's model was trained on.
CLIPS = ["7_jackson_5.wav", "2_lucas_10.wav", "9_jackson_20.wav", "0_lucas_3.wav"]
PROMPT = "Transcribe the audio:"
VOICE = "piper:joe@noise0,w0"  # the server reads answers out with it when asked (a cascade)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def audio_part(path: Path, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(path), "format": fmt}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, tmp: Path, log: Path):
        self.url, self.proc, self.tmp, self.log = url, proc, tmp, log

    def http(self, key: str | None = API_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=120)

    def openai(self, key: str = API_KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)


@pytest.fixture(scope="module")
def server(digits_model, tmp_path_factory):
    out, _, _, r = digits_model
    assert r.returncode == 0, r.stderr[-2000:]
    work = tmp_path_factory.mktemp("serve")
    tmp, gradio_tmp, log = work / "tmp", work / "gradio", work / "server.log"
    tmp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(gradio_tmp), "GRADIO_ANALYTICS_ENABLED": "False",
           "EARFUL_API_KEY": API_KEY}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "earful", "serve", "--model", str(out), "--name", MODEL, "--port", str(port),
                                 "--max-upload-mb", "2", "--max-audio-seconds", "5", "--max-request-audio-seconds", "8",
                                 "--max-clips", "3", "--read-timeout", "3", "--voice", VOICE], env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no /health after 180 s: {log.read_text()[-3000:]}"
        time.sleep(0.5)
    yield Server(url, proc, tmp, log)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def reference(digits_model):
    """The served model in this process, through `earful.load()`: what the server must answer."""
    import earful

    with earful.load(digits_model[0], name=MODEL) as lm:
        yield lm


def reference_answer(lm, *turns, max_new_tokens: int = 128):
    """The engine's answer to a conversation given as (role, text, clip file or None) turns."""
    messages = [{"role": role, "content": [p for p in (text, (FSDD_REC / clip).read_bytes() if clip else None) if p is not None]}
                for role, text, clip in turns]
    return lm.generate(messages, DecodingOptions(max_new_tokens=max_new_tokens))


# -- the official client -------------------------------------------------------------------------
def test_openai_client_chat_with_input_audio(server, reference):
    client = server.openai()
    answers = []
    for name in CLIPS:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": PROMPT}, audio_part(FSDD_REC / name)]}])
        g = reference_answer(reference, ("user", PROMPT, name))
        assert r.choices[0].message.content == g.text, name
        assert r.choices[0].finish_reason == g.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (g.prompt_tokens, g.completion_tokens)
        answers.append(g.text)
    assert len(set(answers)) > 1, answers  # the answer depends on the audio
    # Audio alone asks for what the model was trained to do: a transcript.
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [audio_part(FSDD_REC / CLIPS[0])]}])
    assert r.choices[0].message.content == reference_answer(reference, ("user", None, CLIPS[0])).text
    assert [m.id for m in client.models.list().data] == [MODEL]
    # An M4A upload (decoded through ffmpeg, as every verb does) is heard as the same clip.
    m4a = _ffmpeg_convert(FSDD_REC / CLIPS[0], "m4a")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": PROMPT},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(m4a).decode(), "format": "m4a"}}]}])
    assert r.choices[0].message.content == reference.generate(
        [{"role": "user", "content": [PROMPT, m4a]}], DecodingOptions(max_new_tokens=128)).text


def _ffmpeg_convert(path, fmt: str) -> bytes:
    import tempfile

    from earful.audio import find_ffmpeg

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"clip.{fmt}"
        subprocess.run([find_ffmpeg(), "-loglevel", "error", "-i", str(path), str(out)], check=True)
        return out.read_bytes()


def test_openai_client_streaming_matches_the_whole_answer(server):
    client = server.openai()
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}, audio_part(FSDD_REC / CLIPS[1])]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content and text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage


def _heard(wave: np.ndarray, sampling_rate: int) -> str:
    """What Whisper tiny.en hears in an answer's audio, as digit words ("7." -> "seven")."""
    from earful.audio import resample
    from earful.eval.asr import normalize_digit_words
    from earful.eval.generation import transcribe_whisper

    return normalize_digit_words(transcribe_whisper([resample(wave, sampling_rate, 16000)])[0])


def test_openai_client_gets_the_answer_spoken(server, reference):
    """A spoken digit in, `message.audio` out (the text read out by the server's voice): Whisper hears the answer.

    Whisper tiny.en hears 6 of Piper's 10 isolated digit words right (it hears "zero" as "tiro",
    "two" as "dude", "five" as "bye", "eight" as "hey"): the clips here say seven, nine and six,
    words it hears.
    """
    from earful.eval.asr import normalize_digit_words

    client = server.openai()
    for name in (CLIPS[0], CLIPS[2]):
        said = reference_answer(reference, ("user", None, name)).text
        r = client.chat.completions.create(model=MODEL, modalities=["text", "audio"], audio={"voice": VOICE, "format": "wav"},
                                           messages=[{"role": "user", "content": [audio_part(FSDD_REC / name)]}])
        message = r.choices[0].message
        assert message.content is None and message.audio.transcript == said
        wave, sr = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
        assert sr == 22050 and 0.2 < len(wave) / sr < 5
        assert _heard(wave, sr) == normalize_digit_words(said)  # a digit word: WER 0
    # The spoken answer goes back as a turn by its id, as OpenAI's clients send it.
    follow = [{"role": "user", "content": [{"type": "text", "text": PROMPT}, audio_part(FSDD_REC / name)]},
              {"role": "assistant", "audio": {"id": message.audio.id}},
              {"role": "user", "content": [{"type": "text", "text": PROMPT}, audio_part(FSDD_REC / CLIPS[1])]}]
    answer = client.chat.completions.create(model=MODEL, messages=follow).choices[0].message.content
    assert answer == reference_answer(reference, ("user", PROMPT, name), ("assistant", said, None), ("user", PROMPT, CLIPS[1])).text
    with server.http() as http:
        follow[1]["audio"]["id"] = "audio_never_made"
        _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": follow}), 400, "messages[1].audio.id", "remembers")


def test_openai_client_streams_the_spoken_answer(server, reference):
    """stream + pcm16: transcript pieces and audio chunks as they are made, as OpenAI streams audio."""
    from earful.eval.asr import normalize_digit_words

    client = server.openai()
    name = "6_jackson_12.wav"
    said = reference_answer(reference, ("user", None, name)).text
    chunks = list(client.chat.completions.create(model=MODEL, modalities=["text", "audio"], audio={"voice": VOICE, "format": "pcm16"},
                                                 messages=[{"role": "user", "content": [audio_part(FSDD_REC / name)]}], stream=True))
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    assert "".join(a.transcript or "" for a in audio) == said
    data = [a.data for a in audio if a.data]
    assert data and len({a.id for a in audio}) == 1 and audio[-1].expires_at > time.time()
    pcm = np.frombuffer(b"".join(base64.b64decode(d) for d in data), "<i2").astype(np.float32) / 32768
    assert _heard(pcm, 24000) == normalize_digit_words(said)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, needle", [
    ({"audio": {"format": "mp3"}}, "audio.format"),
    ({"audio": {"format": "wav"}, "stream": True}, "when streaming"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "alloy"),
])
def test_a_spoken_answer_asked_wrongly_is_a_400_naming_the_field(server, body, needle):
    with server.http() as http:
        err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                             "modalities": ["text", "audio"], **body}), 400, needle)
        assert err["param"] == "audio"


def test_without_a_voice_a_listening_model_answers_in_text_only():
    from earful.serve.app import ApiError, parse_chat_request

    with pytest.raises(ApiError, match="text only") as e:
        parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"]}, "m")
    assert e.value.param == "modalities"


def test_multi_turn_conversation(server, reference):
    client = server.openai()
    first, second = CLIPS[0], CLIPS[2]
    said = reference_answer(reference, ("user", PROMPT, first)).text
    messages = [
        {"role": "user", "content": [{"type": "text", "text": PROMPT}, audio_part(FSDD_REC / first)]},
        {"role": "assistant", "content": said},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}, audio_part(FSDD_REC / second)]},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content
    assert answer == reference_answer(reference, ("user", PROMPT, first), ("assistant", said, None), ("user", PROMPT, second)).text


def test_openai_client_transcription(server, reference):
    client = server.openai()
    name = CLIPS[3]
    expected = reference_answer(reference, ("user", None, name)).text
    with open(FSDD_REC / name, "rb") as f:
        r = client.audio.transcriptions.create(model=MODEL, file=f)
    assert r.text == expected
    with open(FSDD_REC / name, "rb") as f:
        assert client.audio.transcriptions.create(model=MODEL, file=f, response_format="text") == expected + "\n"
    # MP3 uploads decode too (libsndfile), in memory.
    wave, sr = sf.read(FSDD_REC / name, dtype="float32")
    mp3 = io.BytesIO()
    sf.write(mp3, wave, sr, format="MP3")
    r = client.audio.transcriptions.create(model=MODEL, file=("clip.mp3", mp3.getvalue()))
    assert r.text == reference.generate([{"role": "user", "content": [mp3.getvalue()]}], DecodingOptions(max_new_tokens=128)).text


# -- errors, each with its status --------------------------------------------------------------
def _error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    for needle in needles:
        assert needle in err["message"], err
    return err


def test_api_key_is_required(server):
    import openai

    with pytest.raises(openai.AuthenticationError):
        server.openai(key="wrong").models.list()
    with server.http(key=None) as http:
        _error(http.get("/v1/models"), 401, "API key")
        _error(http.post("/v1/chat/completions", json={}), 401)
        assert http.get("/health").status_code == 200  # liveness needs no key


def test_unknown_model_is_404(server):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.openai().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with server.http() as http:
        _error(http.get("/v1/models/nope"), 404)


def test_malformed_requests_are_400_and_say_what_is_wrong(server, tmp_path):
    def chat(content, **extra):
        return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}

    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(8000, np.nan, dtype=np.float32), 8000, subtype="FLOAT")
    truncated = (FSDD_REC / CLIPS[0]).read_bytes()[:60]
    with server.http() as http:
        post = lambda body: http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})  # noqa: E731
        _error(post(b'{"model": "digits", "messages": [}'), 400, "not valid JSON")
        _error(post(b"[1, 2]"), 400, "JSON object")
        _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400, "messages")
        _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 400, "model: required")
        bad64 = {"type": "input_audio", "input_audio": {"data": "###not base64###", "format": "wav"}}
        _error(http.post("/v1/chat/completions", json=chat([bad64])), 400, "messages[0].content[0].input_audio.data", "base64")
        text_bytes = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"hello, I am not audio " * 20).decode(), "format": "wav"}}
        _error(http.post("/v1/chat/completions", json=chat([text_bytes])), 400, "messages[0].content[0]", "not")
        trunc = {"type": "input_audio", "input_audio": {"data": base64.b64encode(truncated).decode(), "format": "wav"}}
        _error(http.post("/v1/chat/completions", json=chat([trunc])), 400, "messages[0].content[0]")
        _error(http.post("/v1/chat/completions", json=chat([audio_part(nan)])), 400, "messages[0].content[0]", "NaN")
        _error(http.post("/v1/chat/completions", json=chat([{"type": "input_audio", "input_audio": {"data": "", "format": "aiff"}}])), 400, "format")
        _error(http.post("/v1/chat/completions", json=chat([{"type": "image_url", "image_url": {"url": "x"}}])), 400, "image_url")
        _error(http.post("/v1/chat/completions", json=chat("say <|audio|>")), 400, "reserved")
        _error(http.post("/v1/chat/completions", json=chat("hi", max_tokens=0)), 400, "max_tokens")
        _error(http.post("/v1/audio/transcriptions", data={"model": MODEL}), 400, "file")
        _error(http.post("/v1/audio/transcriptions", data={"model": MODEL}, files={"file": ("../../etc/passwd", b"root:x:0:0")}), 400, "'passwd'")


DEEP = "[" * 2000 + "]" * 2000  # past Python's recursion limit: json.loads raises RecursionError


@pytest.mark.parametrize("body, param, needle", [
    # A field of the wrong type is refused with its name, never read as something else or ignored.
    ({"stream": "false"}, "stream", "expected true or false"),
    ({"seed": "x"}, "seed", "expected an integer"),
    ({"seed": 1.5}, "seed", "expected an integer"),
    ({"stop": 5}, "stop", "expected a string or a list"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"temperature": "0.5"}, "temperature", "expected a number"),
    ({"temperature": 3}, "temperature", "[0, 2]"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"max_tokens": 5.5}, "max_tokens", "expected an integer"),
    ({"max_tokens": True}, "max_tokens", "expected an integer"),
    ({"modalities": 5}, "modalities", "expected a list"),
    ({"modalities": [["text"]]}, "modalities", "expected"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream": True, "stream_options": "yes"}, "stream_options", "expected an object"),
    ({"n": "1"}, "n", "expected an integer"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role", "expected system, developer, user or assistant"),
])
def test_a_wrong_field_is_a_400_naming_it(server, body, param, needle):
    with server.http() as http:
        err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}), 400, needle)
        assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw, needle", [
    ('{"model": "digits", "messages": [{"role": "user", "content": "hi"}], "x": %s}' % DEEP, "nested too deeply"),
    ('{"model": "digits", "messages": %s}' % DEEP, "nested too deeply"),
    ('{"model": "digits", "messages": [{"role": "user", "content": [{"type": %s}]}]}' % DEEP, "nested too deeply"),
    ('{"model": "digits", "messages": [{"role": %s, "content": "hi"}]}' % DEEP, "nested too deeply"),
    ('{"model": "digits", "messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}' % ("[" * 40 + "]" * 40),
     "nested too deeply"),  # deep enough to refuse, not enough to break the parser
    ('{"model": "digits", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "not valid JSON"),
    ('{"model": "digits", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', "max_tokens"),
    ('{"model": "digits", "messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}' % ("9" * 5000), "not valid JSON"),
], ids=["deep-field", "deep-messages", "deep-part-type", "deep-role", "40-deep-text", "NaN", "1e400", "5000-digit-int"])
def test_no_json_body_breaks_the_server(server, raw, needle):
    with server.http() as http:
        r = http.post("/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
        _error(r, 400, needle)
        assert http.get("/health").status_code == 200


def test_a_tiny_temperature_is_greedy_not_a_500(server, reference):
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}, audio_part(FSDD_REC / CLIPS[0])]}]
    greedy = reference_answer(reference, ("user", PROMPT, CLIPS[0])).text
    with server.http() as http:
        for t in (1e-45, 1e-30, 0.001):
            r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": t})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == greedy


def test_stop_sequences_and_seed_over_http(server, reference):
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}, audio_part(FSDD_REC / CLIPS[1])]}]
    greedy = reference_answer(reference, ("user", PROMPT, CLIPS[1])).text
    assert len(greedy) >= 2, greedy
    stop = greedy[1:]  # all but the first character
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "stop": stop})
        assert r.json()["choices"][0]["message"]["content"] == greedy[:1].strip() and r.json()["choices"][0]["finish_reason"] == "stop"
        sampled = [http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 1.5, "seed": 7,
                                                           "max_tokens": 12}).json()["choices"][0]["message"]["content"] for _ in range(2)]
        assert sampled[0] == sampled[1]


def test_limits_413_and_duration(server, tmp_path):
    # Six FSDD clips end to end: over the server's 5 s limit.
    waves = [sf.read(FSDD_REC / f"{d}_jackson_0.wav", dtype="float32")[0] for d in range(10)]
    long_wav = tmp_path / "long.wav"
    sf.write(long_wav, np.concatenate(waves * 2), 8000)
    assert sf.info(long_wav).duration > 5
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": [audio_part(long_wav)]}]})
        _error(r, 400, "messages[0].content[0]", "10.5 s long", "max_seconds=5")
        _error(http.post("/v1/audio/transcriptions", data={"model": MODEL}, files={"file": ("long.wav", long_wav.read_bytes())}), 400, "'long.wav'", "max_seconds=5")
        # Over --max-upload-mb 2, told by Content-Length ...
        _error(http.post("/v1/audio/transcriptions", data={"model": MODEL}, files={"file": ("big.wav", b"\0" * (3 << 20))}), 413)
        # ... and counted while a chunked body streams in (no Content-Length).
        r = http.post("/v1/chat/completions", content=iter([b"x" * (1 << 20)] * 3), headers={"content-type": "application/json"})
        _error(r, 413)
        # A 1.5 MB upload spools to a temporary file inside the server; none is left behind.
        big = np.random.default_rng(0).uniform(-0.1, 0.1, 16000 * 48).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, big, 16000, format="WAV", subtype="PCM_16")
        assert 1 << 20 < len(buf.getvalue()) < 2 << 20
        _error(http.post("/v1/audio/transcriptions", data={"model": MODEL}, files={"file": ("big.wav", buf.getvalue())}), 400, "max_seconds=5")
        assert http.get("/health").status_code == 200
    assert list(server.tmp.iterdir()) == []


def _long_clip(tmp_path: Path, seconds: float) -> Path:
    wave = sf.read(FSDD_REC / CLIPS[0], dtype="float32")[0]
    path = tmp_path / f"{seconds:g}s.wav"
    sf.write(path, np.tile(wave, int(np.ceil(seconds * 8000 / len(wave))))[: int(seconds * 8000)], 8000)
    return path


def test_request_audio_is_bounded_in_clips_and_seconds(server, tmp_path):
    """--max-clips 3 and --max-request-audio-seconds 8: refused from the parts and the headers, nothing decoded."""
    clip = audio_part(FSDD_REC / CLIPS[0])
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": [clip] * 4}]})
        _error(r, 400, "4 input_audio parts in one request, over this server's limit of 3")
        long = audio_part(_long_clip(tmp_path, 4.5))  # under the 5 s a clip may last; two are over the 8 s a request may
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": [long, long]}]})
        _error(r, 400, "9.0 s of audio in one request, over the limit of 8 s", "--max-request-audio-seconds")
        r = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [long, clip]}]})
        assert r.status_code == 200, r.text


def test_a_200_mb_upload_gets_a_413_every_python_client_reads(server):
    """The body is drained (up to 256 MB) before the 413, so clients that send it all before reading still read the answer."""
    import requests

    big = b"\0" * (200 << 20)
    url, auth = f"{server.url}/v1/audio/transcriptions", {"Authorization": f"Bearer {API_KEY}"}
    request = urllib.request.Request(url, data=big, headers={**auth, "Content-Type": "application/octet-stream"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=120)
    assert e.value.code == 413 and json.loads(e.value.read())["error"]["code"] == "request_too_large"
    r = requests.post(url, data=big, headers=auth, timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url, content=big, headers=auth, timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # A client that asks first (Expect: 100-continue) gets the 413 instead of a 100 Continue, and sends nothing.
    with socket.create_connection(server.address, timeout=30) as s:
        s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(big))
        reply = _read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in reply and b"request_too_large" in reply


def _read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_a_client_that_leaves_mid_body_is_one_log_line(server):
    start = server.log.stat().st_size
    for _ in range(3):
        with socket.create_connection(server.address, timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer %s\r\nContent-Length: 100000\r\n\r\n{\"model\": " % API_KEY.encode())
    deadline = time.monotonic() + 10
    while (lines := server.log.read_bytes()[start:].decode().splitlines()).__len__() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(lines) == 3 and all("the client disconnected" in line for line in lines), lines
    with server.http() as http:
        assert http.get("/health").status_code == 200


# -- a tiny random model, served in this process: long generations, and the engine in reach ---------
class TinyServer:
    def __init__(self, url: str, lm):
        self.url, self.lm = url, lm

    def http(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)


@pytest.fixture(scope="module")
def tiny_server(smol_dir, whisper_dir):
    from transformers import AutoFeatureExtractor, AutoTokenizer

    from earful.models.build import assemble
    from earful.serve.app import create_app
    from earful.serve.engine import SpeechLM

    tok = AutoTokenizer.from_pretrained(smol_dir)
    enc, txt = tiny_configs(len(tok))
    torch.manual_seed(0)
    model, processor = assemble(enc, txt, tok, AutoFeatureExtractor.from_pretrained(whisper_dir), stack_factor=2, projector_hidden_size=48)
    lm = SpeechLM(model.eval(), processor, name="tiny", max_batch_size=2, batch_wait_s=0.02, max_queue=2)
    app = create_app(lm, read_timeout_s=1.5, ui=False)
    with uvicorn_in_thread(app, start_timeout=30) as port:
        yield TinyServer(f"http://127.0.0.1:{port}", lm)
    lm.close()


def tiny_chat(max_tokens: int, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}


def _wait_for(condition, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def test_a_client_that_leaves_cancels_its_generation(tiny_server, caplog):
    caplog.set_level(logging.INFO, logger="earful.serve")
    lm, steps = tiny_server.lm, Steps(tiny_server.lm.model)
    cancelled = lm.counts["cancelled"]
    try:
        with tiny_server.http() as http:
            # A stream read for a moment, then dropped.
            with http.stream("POST", "/v1/chat/completions", json=tiny_chat(4000, stream=True, temperature=1.0)) as r:
                assert r.status_code == 200, r.read()
                lines = r.iter_lines()
                assert '"role": "assistant"' in next(lines)
                _wait_for(lambda: steps.n > 10, "generation")
            at_leaving = steps.n
            _wait_for(lambda: lm.counts["cancelled"] == cancelled + 1, "cancellation")
            assert steps.n - at_leaving < 300, f"{steps.n - at_leaving} steps after the client left (4000 without cancelling)"
            # The next request gets the model at once.
            r = http.post("/v1/chat/completions", json=tiny_chat(1))
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
            # A plain request whose client gives up.
            before = steps.n
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/chat/completions", json=tiny_chat(4000), timeout=0.5)
            _wait_for(lambda: lm.counts["cancelled"] == cancelled + 2, "cancellation")
            stopped_at = steps.n
            time.sleep(0.3)
            assert steps.n == stopped_at and stopped_at - before < 3000  # nothing runs on for nobody
            assert http.get("/health").json()["cancelled"] == cancelled + 2
    finally:
        steps.handle.remove()
    left = [r for r in caplog.records if r.name.startswith("earful.serve")]
    assert [r.exc_info for r in left] == [None, None] and "left mid-stream" in left[0].getMessage() \
        and "disconnected before its answer" in left[1].getMessage(), [r.getMessage() for r in left]


def test_a_full_queue_is_429_with_retry_after(tiny_server):
    import openai
    from openai import OpenAI

    lm = tiny_server.lm
    with tiny_server.http() as http, ThreadPoolExecutor(2) as pool:
        with http.stream("POST", "/v1/chat/completions", json=tiny_chat(4000, stream=True)) as running:
            lines = running.iter_lines()  # kept: dropping httpx's iterator closes the connection
            next(lines)
            _wait_for(lambda: lm.queued == 0, "the first request running")
            waiting = [pool.submit(httpx.post, f"{tiny_server.url}/v1/chat/completions", json=tiny_chat(1), timeout=60) for _ in range(2)]
            _wait_for(lambda: lm.queued == 2, "two requests queued")  # --max-queue 2
            r = http.post("/v1/chat/completions", json=tiny_chat(1))
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error" and "2 requests are waiting" in r.json()["error"]["message"]
            with pytest.raises(openai.RateLimitError):
                OpenAI(base_url=f"{tiny_server.url}/v1", api_key="none", max_retries=0).chat.completions.create(**tiny_chat(1))
        # The dropped stream frees the model; the queued requests are answered.
        assert [w.result().status_code for w in waiting] == [200, 200]
        assert http.post("/v1/chat/completions", json=tiny_chat(1)).status_code == 200


def test_an_unexpected_failure_is_a_500_in_openai_shape(tiny_server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a fault of the server's own (simulated)")

    monkeypatch.setattr(tiny_server.lm.model, "generate", broken)
    with tiny_server.http() as http:
        r = http.post("/v1/chat/completions", json=tiny_chat(3))
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error" and "RuntimeError" in r.json()["error"]["message"]
        r = http.get("/v1/no-such-route")
        assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    monkeypatch.undo()
    with tiny_server.http() as http:
        assert http.post("/v1/chat/completions", json=tiny_chat(3)).status_code == 200


def test_a_stalled_body_gets_a_408_and_the_connection_closes(tiny_server):
    with socket.create_connection(tiny_server.address, timeout=20) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        started = time.monotonic()
        reply = _read_until_closed(s)  # ends only when the server closes the connection
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in reply and b"connection: close" in reply.lower()
    assert 1.0 < waited < 10, waited  # read_timeout_s=1.5


# -- the command line ----------------------------------------------------------------------------
def test_serve_refuses_a_bad_port_or_a_busy_one_in_one_line(digits_model):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "earful", "serve", "--model", str(digits_model[0]), "--no-ui", *args],
                              capture_output=True, text=True, timeout=120)

    r = serve("--port", "99999")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "error: --port 99999: expected 1 to 65535\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        r = serve("--port", str(port))
    assert r.returncode == 2 and "serving" not in r.stdout, r.stdout
    assert r.stderr.splitlines() == [f"error: --host 127.0.0.1 --port {port}: cannot listen there: the port is in use "
                                     "(another server?); pick another with --port"]
    assert time.monotonic() - started < 60  # before the model loads


# -- load ----------------------------------------------------------------------------------------
def test_bounded_load_has_no_failures(server, tmp_path):
    from earful.serve.loadtest import run_load

    report = run_load(server.url, MODEL, [FSDD_REC / name for name in CLIPS], clients=8, requests_per_client=8, api_key=API_KEY)
    (tmp_path / "serve_load.json").write_text(json.dumps(report, indent=2))
    assert report["requests"] == 64 and report["failures"] == 0, report["failure_examples"]
    assert 0 < report["p50_s"] <= report["p95_s"] <= report["max_s"]


# -- the browser ---------------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"


def test_gradio_ui_in_headless_chromium(server, reference):
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import expect, sync_playwright

    name = CLIPS[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/ui/", wait_until="networkidle")
            # The API key guards the UI too: Gradio's login form.
            page.get_by_label("username").fill("tester")
            page.get_by_label("password").fill(API_KEY)
            page.get_by_role("button", name="Login").click()
            page.locator("#earful-audio input[type=file]").set_input_files(str(FSDD_REC / name))
            page.locator("#earful-send").click()
            bot = page.locator('#earful-chat [data-testid="bot"]').last
            expect(bot).to_contain_text(re.compile(r"\w"), timeout=60_000)
            expect(page.locator("#earful-send")).to_be_enabled(timeout=60_000)
            page.wait_for_timeout(500)  # the last streamed piece
            answer = bot.inner_text()
            # The server has a voice: the answer is also played, read out by it.
            expect(page.locator("#earful-spoken audio[src]").first).to_be_attached(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "serve_ui.png"), full_page=True)
        finally:
            browser.close()
    assert answer == reference_answer(reference, ("user", None, name)).text


# -- Python ---------------------------------------------------------------------------------------
def test_earful_load_in_python(reference, tmp_path):
    lm = reference  # earful.load() of the served model
    name = CLIPS[2]
    said = lm.transcribe(FSDD_REC / name)
    assert said == reference_answer(lm, ("user", None, name), max_new_tokens=64).text
    spoken = lm.chat(audio=FSDD_REC / name, audio_out=True)  # read out by the default voice
    assert spoken.text == said and spoken.voice == VOICE and len(spoken.audio) > 0.2 * spoken.sampling_rate
    wave, sr = sf.read(spoken.save(tmp_path / "answer.wav"), dtype="float32")
    assert sr == spoken.sampling_rate and np.abs(wave - spoken.audio).max() < 1e-4
    assert lm.transcribe(str(FSDD_REC / name)) == said  # a str is a file path here
    assert lm.transcribe((FSDD_REC / name).read_bytes()) == said
    wave, sr = sf.read(FSDD_REC / name, dtype="float32")
    assert lm.transcribe((wave, sr)) == said  # resampled from 8 kHz
    assert lm.chat(f"{PROMPT} <|audio|>", audio=(wave, sr)) == reference_answer(lm, ("user", PROMPT, name)).text
    pieces = list(lm.stream_chat(audio=FSDD_REC / name, max_new_tokens=64))
    assert len(pieces) >= 1 and "".join(pieces) == said
    # Concurrent callers are batched and get the answers they would get alone.
    files = [FSDD_REC / n for n in CLIPS] * 2
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lm.transcribe, files))
    assert together == [lm.transcribe(f) for f in files]
