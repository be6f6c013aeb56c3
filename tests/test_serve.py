"""`earful serve` as a real server process on 127.0.0.1, driven by real clients.

The official `openai` client (chat with input_audio, streaming, transcription), raw HTTP for every
error status, a bounded load test, headless Chromium through Playwright on the Gradio UI, and
`earful.load()` in process. The model is the session's short run of recipes/digits.yaml
(conftest.digits_model), asked about recordings of the speakers it was trained on.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import FSDD_REC, ROOT

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
MODEL = "digits"
# (file, digit word): speakers the session's model was trained on, so the answers are known.
CLIPS = [("7_jackson_5.wav", "seven"), ("2_lucas_10.wav", "two"), ("9_jackson_20.wav", "nine"), ("0_lucas_3.wav", "zero")]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def audio_part(path: Path, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(path), "format": fmt}}


def same_digit(answer: str, word: str) -> bool:
    from earful.eval.asr import normalize

    return normalize(answer) == normalize(word)


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
                                 "--max-upload-mb", "2", "--max-audio-seconds", "5"], env=env, stdout=f, stderr=subprocess.STDOUT)
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


# -- the official client -------------------------------------------------------------------------
def test_openai_client_chat_with_input_audio(server):
    client = server.openai()
    for name, word in CLIPS:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "Transcribe the audio:"}, audio_part(FSDD_REC / name)]}])
        answer = r.choices[0].message.content
        assert same_digit(answer, word), (name, answer)
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 10
    # Audio alone asks for what the model was trained to do: a transcript.
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [audio_part(FSDD_REC / CLIPS[0][0])]}])
    assert same_digit(r.choices[0].message.content, CLIPS[0][1])
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_openai_client_streaming_matches_the_whole_answer(server):
    client = server.openai()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Transcribe the audio:"}, audio_part(FSDD_REC / CLIPS[1][0])]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole and same_digit(text, CLIPS[1][1])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_multi_turn_conversation(server):
    client = server.openai()
    (first, w1), (second, w2) = CLIPS[0], CLIPS[2]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Transcribe the audio:"}, audio_part(FSDD_REC / first)]},
        {"role": "assistant", "content": w1},
        {"role": "user", "content": [{"type": "text", "text": "Transcribe the audio:"}, audio_part(FSDD_REC / second)]},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content
    assert same_digit(answer, w2), answer


def test_openai_client_transcription(server):
    client = server.openai()
    name, word = CLIPS[3]
    with open(FSDD_REC / name, "rb") as f:
        r = client.audio.transcriptions.create(model=MODEL, file=f)
    assert same_digit(r.text, word), r.text
    with open(FSDD_REC / name, "rb") as f:
        text = client.audio.transcriptions.create(model=MODEL, file=f, response_format="text")
    assert same_digit(text, word)
    # MP3 uploads decode too (libsndfile), in memory.
    wave, sr = sf.read(FSDD_REC / name, dtype="float32")
    mp3 = io.BytesIO()
    sf.write(mp3, wave, sr, format="MP3")
    r = client.audio.transcriptions.create(model=MODEL, file=("clip.mp3", mp3.getvalue()))
    assert r.text.strip()


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
    truncated = (FSDD_REC / CLIPS[0][0]).read_bytes()[:60]
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
        _error(http.post("/v1/chat/completions", json=chat("hi", modalities=["text", "audio"])), 400, "text only")
        _error(http.post("/v1/chat/completions", json=chat("hi", max_tokens=0)), 400, "max_tokens")
        _error(http.post("/v1/audio/transcriptions", data={"model": MODEL}), 400, "file")
        _error(http.post("/v1/audio/transcriptions", data={"model": MODEL}, files={"file": ("../../etc/passwd", b"root:x:0:0")}), 400, "'passwd'")


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


# -- load ----------------------------------------------------------------------------------------
def test_bounded_load_has_no_failures(server, tmp_path):
    from earful.serve.loadtest import run_load

    report = run_load(server.url, MODEL, [FSDD_REC / name for name, _ in CLIPS], clients=8, requests_per_client=8, api_key=API_KEY)
    (tmp_path / "serve_load.json").write_text(json.dumps(report, indent=2))
    assert report["requests"] == 64 and report["failures"] == 0, report["failure_examples"]
    assert 0 < report["p50_s"] <= report["p95_s"] <= report["max_s"]


# -- the browser ---------------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"


def test_gradio_ui_in_headless_chromium(server):
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import expect, sync_playwright

    name, word = CLIPS[0]
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
            page.screenshot(path=str(ARTIFACTS / "serve_ui.png"), full_page=True)
        finally:
            browser.close()
    assert same_digit(answer, word), answer


# -- Python ---------------------------------------------------------------------------------------
def test_earful_load_in_python(digits_model):
    import earful

    out = digits_model[0]
    with earful.load(out, name="py") as lm:
        name, word = CLIPS[2]
        assert same_digit(lm.transcribe(FSDD_REC / name), word)
        assert same_digit(lm.transcribe(str(FSDD_REC / name)), word)  # a str is a file path here
        wave, sr = sf.read(FSDD_REC / name, dtype="float32")
        assert same_digit(lm.chat("Transcribe the audio: <|audio|>", audio=(wave, sr)), word)
        pieces = list(lm.stream_chat(audio=FSDD_REC / name))
        assert len(pieces) >= 1 and same_digit("".join(pieces), word)
        # Concurrent callers are batched and get the answers they would get alone.
        from concurrent.futures import ThreadPoolExecutor

        files = [FSDD_REC / n for n, _ in CLIPS] * 2
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lm.transcribe, files))
        assert together == [lm.transcribe(f) for f in files]
        assert all(same_digit(a, w) for a, (_, w) in zip(together, CLIPS * 2))
