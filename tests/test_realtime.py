"""`/v1/realtime`: a real WebSocket client (the `websockets` package) streams FSDD audio in 100 ms
chunks of 24 kHz pcm16 to the session's digits model behind uvicorn, and reads the answer.

The answers are checked against the same model's own answers to the same audio through
`earful.load()` (not against what a short training run happens to get right).
"""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest

from conftest import FSDD_REC, uvicorn_in_thread

pytestmark = pytest.mark.slow

KEY = "rt-key"
VOICE = "piper:joe@noise0,w0"
RATE = 24000


@pytest.fixture(scope="module")
def served(digits_model):
    import earful
    from earful.serve.app import create_app

    out, _, _, r = digits_model
    assert r.returncode == 0, r.stderr[-2000:]
    lm = earful.load(out, name="digits", voice=VOICE, max_audio_seconds=20)
    with uvicorn_in_thread(create_app(lm, api_key=KEY, ui=False)) as port:
        yield f"ws://127.0.0.1:{port}/v1/realtime?model=digits", lm
    lm.close()


def pcm24(name: str, silence_s: float = 0.0) -> bytes:
    from earful.audio import load_audio

    wave = np.concatenate([load_audio(FSDD_REC / name, RATE), np.zeros(int(silence_s * RATE), np.float32)])
    return (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()


def wave_of(pcm: bytes) -> tuple[np.ndarray, int]:
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0, RATE


class Client:
    def __init__(self, url: str, key: str = KEY):
        from websockets.sync.client import connect

        self.ws = connect(url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None, open_timeout=30).__enter__()
        self.created = self.next()
        assert self.created["type"] == "session.created"

    def send(self, kind: str, **fields) -> None:
        self.ws.send(json.dumps({"type": kind, **fields}))

    def next(self, timeout: float = 120) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def until(self, kind: str) -> list[dict]:
        events = []
        while True:
            events.append(self.next())
            if events[-1]["type"] == kind:
                return events

    def stream(self, pcm: bytes, chunk_s: float = 0.1) -> None:
        step = int(chunk_s * RATE) * 2
        for i in range(0, len(pcm), step):
            self.send("input_audio_buffer.append", audio=base64.b64encode(pcm[i : i + step]).decode())

    def ask(self, pcm: bytes) -> list[dict]:
        """A turn with the client committing it (turn_detection null): stream, commit, ask; the events to response.done."""
        self.stream(pcm)
        self.send("input_audio_buffer.commit")
        self.send("response.create")
        return self.until("response.done")

    def close(self) -> None:
        self.ws.__exit__(None, None, None)


def text_of(events: list[dict]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.text.delta")


def test_a_committed_turn_is_answered_as_the_model_answers_it(served):
    url, lm = served
    client = Client(url)
    try:
        assert client.created["session"]["input_audio_sample_rate"] == RATE
        client.send("session.update", session={"turn_detection": None})
        assert client.next()["type"] == "session.updated"
        first, second = pcm24("7_jackson_5.wav"), pcm24("2_lucas_10.wav")
        client.stream(first)
        client.send("input_audio_buffer.commit")
        committed = client.until("conversation.item.created")
        assert committed[0]["type"] == "input_audio_buffer.committed"
        client.send("response.create")
        events = client.until("response.done")
        said = lm.transcribe(wave_of(first))
        assert text_of(events) == said and said
        done = events[-1]["response"]
        assert done["status"] == "completed" and done["usage"]["output_tokens"] > 0
        assert [e for e in events if e["type"] == "response.text.done"][0]["text"] == said
        # A second turn is answered with the first in context, as the engine answers the conversation.
        events = client.ask(second)
        from earful.serve.engine import DecodingOptions

        expected = lm.generate([{"role": "user", "content": [wave_of(first)]}, {"role": "assistant", "content": said},
                                {"role": "user", "content": [wave_of(second)]}], DecodingOptions(max_new_tokens=128)).text
        assert text_of(events) == expected
    finally:
        client.close()


def test_server_vad_ends_the_turn_and_answers_by_itself(served):
    url, lm = served
    client = Client(url)
    try:
        pcm = pcm24("9_jackson_20.wav", silence_s=1.2)
        client.stream(pcm)  # nothing more from the client: the silence ends the turn
        events = client.until("response.done")
        kinds = [e["type"] for e in events]
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped") \
            < kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
        heard = pcm[: len(pcm)]  # the buffer up to the commit: the clip and the silence the VAD waited for
        stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")["audio_end_ms"]
        assert 0.4 < stopped / 1000 - len(pcm24("9_jackson_20.wav")) / 2 / RATE < 1.2
        assert text_of(events) == lm.transcribe(wave_of(heard[: int(stopped / 1000 * RATE) * 2]))
    finally:
        client.close()


def test_a_spoken_answer_streams_as_pcm16_that_whisper_hears(served):
    from earful.audio import resample
    from earful.eval.asr import normalize_digit_words
    from earful.eval.generation import transcribe_whisper

    url, lm = served
    client = Client(url)
    try:
        client.send("session.update", session={"turn_detection": None, "modalities": ["text", "audio"]})
        assert client.next()["session"]["voice"] == VOICE
        pcm = pcm24("7_jackson_5.wav")
        events = client.ask(pcm)
        said = lm.transcribe(wave_of(pcm))
        assert "".join(e["delta"] for e in events if e["type"] == "response.audio_transcript.delta") == said
        audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.audio.delta")
        heard = transcribe_whisper([resample(np.frombuffer(audio, "<i2").astype(np.float32) / 32768, RATE, 16000)])[0]
        assert normalize_digit_words(heard) == normalize_digit_words(said)
    finally:
        client.close()


def test_garbage_gets_an_error_event_naming_the_field_and_the_session_goes_on(served):
    url, lm = served
    client = Client(url)
    try:
        bad = [
            ("not json at all", None, "invalid_json"),
            (json.dumps({"type": "teleport"}), "type", "unknown_event"),
            (json.dumps([1, 2]), "type", "invalid_event"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "###"}), "audio", "invalid_event"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}), "audio", "invalid_event"),
            (json.dumps({"type": "input_audio_buffer.commit"}), None, "input_audio_buffer_commit_empty"),
            (json.dumps({"type": "session.update", "session": {"input_audio_sample_rate": 3}}), "session.input_audio_sample_rate", "invalid_event"),
            (json.dumps({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}), "session.input_audio_format", "invalid_event"),
            (json.dumps({"type": "response.create"}), None, "no_user_turn"),
            (json.dumps({"type": "response.cancel"}), None, "response_cancel_not_active"),
        ]
        for raw, param, code in bad:
            client.ws.send(raw)
            e = client.next()
            assert e["type"] == "error" and e["error"]["code"] == code and e["error"]["param"] == param, (raw, e)
        # Over the server's --max-audio-seconds uncommitted: refused, the buffer as it was.
        big = base64.b64encode(bytes(2 * RATE * int(lm.max_audio_seconds + 1))).decode()
        client.send("session.update", session={"turn_detection": None})
        client.next()
        client.send("input_audio_buffer.append", audio=big)
        assert client.next()["error"]["code"] == "input_audio_buffer_full"
        # Still a working session.
        pcm = pcm24("9_jackson_20.wav")
        assert text_of(client.ask(pcm)) == lm.transcribe(wave_of(pcm))
    finally:
        client.close()


def test_a_wrong_key_is_refused_and_a_client_that_leaves_mid_utterance_is_let_go(served):
    from websockets.exceptions import ConnectionClosed

    url, lm = served
    from websockets.sync.client import connect

    with connect(url, additional_headers={"Authorization": "Bearer wrong"}) as ws:
        told = json.loads(ws.recv(timeout=30))
        assert told["type"] == "error" and told["error"]["code"] == "invalid_api_key"
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=30)
    assert e.value.rcvd.code == 1008 and "API key" in e.value.rcvd.reason
    leaver = Client(url)
    leaver.send("session.update", session={"turn_detection": None})
    leaver.next()
    leaver.stream(pcm24("7_jackson_5.wav")[: RATE])  # half a clip, then gone
    leaver.send("input_audio_buffer.commit")
    leaver.send("response.create")
    leaver.close()
    client = Client(url)  # the server serves the next client as before
    try:
        client.send("session.update", session={"turn_detection": None})
        client.next()
        pcm = pcm24("2_lucas_10.wav")
        assert text_of(client.ask(pcm)) == lm.transcribe(wave_of(pcm))
    finally:
        client.close()
