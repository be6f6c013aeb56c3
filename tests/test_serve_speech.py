"""Speech out: `earful serve` on a units LM whose tokenizer is a codec answers in audio, the way
OpenAI's audio output does (`message.audio.data`, base64 WAV), driven by the official client.

The model is tiny and random (a config-built Llama with sound tokens and a config-built Mimi
codec, as transformers tests its models): what is checked is the path, the format and the
errors, not what the continuation sounds like.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time

import httpx
import pytest
import soundfile as sf
import torch

from conftest import FSDD_REC
from test_serve import audio_part, free_port
from test_spoken_eval import make_lm

MODEL = "speaker"


@pytest.fixture(scope="module")
def codec_lm_dir(smol_dir, tmp_path_factory):
    from transformers import MimiConfig, MimiModel

    from earful.models.vocab import save_unit_lm
    from earful.tokenizers.codec import CodecTokenizer

    cfg = MimiConfig(hidden_size=32, num_filters=8, codebook_size=16, codebook_dim=16, num_quantizers=4,
                     num_semantic_quantizers=1, upsample_groups=32, num_hidden_layers=1, intermediate_size=64,
                     num_attention_heads=2, num_key_value_heads=2, vector_quantization_hidden_dimension=16, sliding_window=16)
    torch.manual_seed(0)
    codec = CodecTokenizer(MimiModel(cfg).eval(), num_codebooks=3)
    folder = tmp_path_factory.mktemp("codec_lm") / "lm"
    save_unit_lm(make_lm(smol_dir, codec.vocab_size, codec), folder)
    return folder


@pytest.fixture(scope="module")
def server(codec_lm_dir, fsdd, tmp_path_factory):
    log = tmp_path_factory.mktemp("speech_serve") / "server.log"
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "earful", "serve", "--model", str(codec_lm_dir), "--name", MODEL, "--port", str(port)],
                                env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_openai_client_gets_a_spoken_answer(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=MODEL, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"},
                                       messages=[{"role": "user", "content": [audio_part(FSDD_REC / "4_george_2.wav")]}],
                                       max_tokens=30, seed=1)
    message = r.choices[0].message
    assert message.content is None and message.audio.id.startswith("audio_") and message.audio.expires_at > time.time()
    wave, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    assert rate == 24000 and len(wave) > 0 and len(wave) % 1920 == 0  # whole codec frames (Mimi: 1920 samples)
    assert r.usage.completion_tokens == len(wave) // 1920 * 3 and r.usage.prompt_tokens > 0


def test_speaking_model_errors(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": [audio_part(FSDD_REC / "4_george_2.wav")]}]}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "answers in speech" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={**body, "modalities": ["text", "audio"], "audio": {"format": "mp3"}})
        assert r.status_code == 400 and "audio.format" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={**body, "modalities": ["text", "audio"], "stream": True})
        assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={"model": MODEL, "modalities": ["text", "audio"], "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "input_audio" in r.json()["error"]["message"]
        r = http.post("/v1/audio/transcriptions", data={"model": MODEL}, files={"file": ("a.wav", (FSDD_REC / "4_george_2.wav").read_bytes())})
        assert r.status_code == 400 and "does not transcribe" in r.json()["error"]["message"]
        # Sampling options of the wrong type or out of range are a 400 naming the field (temperature=3 was a 500).
        spoken = {**body, "modalities": ["text", "audio"], "max_tokens": 6}
        for extra, param in (({"temperature": 3}, "temperature"), ({"seed": "x"}, "seed"), ({"stop": "x"}, "stop"),
                             ({"stream": "false"}, "stream")):
            r = http.post("/v1/chat/completions", json={**spoken, **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_tiny_temperature_speaks_greedily(server):
    """temperature=1e-45 is greedy decoding, the same answer as temperature 0, not NaN probabilities and a 500."""
    with httpx.Client(base_url=server, timeout=60) as http:
        body = {"model": MODEL, "modalities": ["text", "audio"], "max_tokens": 12,
                "messages": [{"role": "user", "content": [audio_part(FSDD_REC / "4_george_2.wav")]}]}
        answers = [http.post("/v1/chat/completions", json={**body, "temperature": t}) for t in (0, 1e-45)]
        assert [r.status_code for r in answers] == [200, 200], answers[-1].text
        assert answers[0].json()["choices"][0]["message"]["audio"]["data"] == answers[1].json()["choices"][0]["message"]["audio"]["data"]


def test_earful_load_gives_a_speaking_model(codec_lm_dir, fsdd):
    import earful
    from earful.serve.engine import SpeakingLM

    lm = earful.load(codec_lm_dir)
    assert isinstance(lm, SpeakingLM) and lm.can_speak and lm.sampling_rate == 24000
    prompt, units, wave = lm.continue_speech(FSDD_REC / "4_george_2.wav", max_new_tokens=12, seed=0)
    assert len(units) % 3 == 0 and len(wave) == len(units) // 3 * 1920
    assert lm.continue_speech(FSDD_REC / "4_george_2.wav", max_new_tokens=12, seed=0)[1] == units  # seeded: the same again
