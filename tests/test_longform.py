"""Long-form audio: recordings longer than the encoder takes, cut into segments, transcribed with timestamps.

The recording is real speech: 40 of jackson's FSDD digits (a speaker the session's digits model
was trained on) one after another with 1-1.75 s pauses, about 74 s at FSDD's own 8 kHz, so the
decoder resamples as it streams. The model's answers are checked against its own answers on each
digit's clip, not against which digits a model trained once for the test run gets right. Memory
is measured with tracemalloc on a tiny random model: the peak stays put when the file doubles.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import time
import tracemalloc

import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import FSDD_REC, uvicorn_in_thread

from earful.eval.longform import (Segment, Transcript, _seam, stated_seconds, stream_audio, texts_of, to_json, to_srt, to_vtt,
                                  transcribe_long)

RATE = 8000  # FSDD's own
N_DIGITS = 40


def _recording(seed: int = 0) -> tuple[np.ndarray, list[tuple[str, float, float]], list[str]]:
    """(8 kHz wave, (digit word, start, end) of each digit, the source clips) of jackson's digits with pauses."""
    from earful.data.fsdd import DIGIT_WORDS

    rng = np.random.default_rng(seed)
    clips = sorted(FSDD_REC.glob("*_jackson_*.wav"))
    clips = [clips[i] for i in rng.permutation(len(clips))[:N_DIGITS]]
    parts, words, t = [np.zeros(RATE // 2, np.float32)], [], RATE // 2
    for clip in clips:
        wave = sf.read(clip, dtype="float32")[0]
        words.append((DIGIT_WORDS[int(clip.name[0])], t / RATE, (t + len(wave)) / RATE))
        pause = np.zeros(round(rng.uniform(1.0, 1.75) * RATE), np.float32)
        parts += [wave, pause]
        t += len(wave) + len(pause)
    return np.concatenate(parts), words, [str(c) for c in clips]


@pytest.fixture(scope="module")
def recording(fsdd, tmp_path_factory):
    """(path, digit words with their times, source clips, seconds)."""
    wave, words, clips = _recording()
    path = tmp_path_factory.mktemp("longform") / "digits.wav"
    sf.write(path, wave, RATE, subtype="PCM_16")
    return path, words, clips, len(wave) / RATE


def _twice(recording, tmp_path) -> tuple:
    wave = sf.read(recording[0], dtype="float32")[0]
    path = tmp_path / "twice.wav"
    sf.write(path, np.concatenate([wave, wave]), RATE, subtype="PCM_16")
    return path, 2 * len(wave) / RATE


class Served:
    def __init__(self, url: str, lm):
        self.url, self.lm = url, lm

    def transcribe(self, path, **form) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=300) as http:
            return http.post("/v1/audio/transcriptions", data={"model": "digits", **form},
                             files={"file": (path.name, path.read_bytes())})


@pytest.fixture(scope="module")
def served(digits_model):
    """The session's digits model behind a real HTTP server (uvicorn in this process), at most 100 s a request."""
    import earful
    from earful.serve.app import create_app

    out, _, _, r = digits_model
    assert r.returncode == 0, r.stderr[-2000:]
    lm = earful.load(out, name="digits", max_request_audio_seconds=100)
    with uvicorn_in_thread(create_app(lm, ui=False)) as port:
        yield Served(f"http://127.0.0.1:{port}", lm)
    lm.close()


@pytest.fixture(scope="module")
def verbose(served, recording):
    """The recording through POST /v1/audio/transcriptions, response_format verbose_json."""
    r = served.transcribe(recording[0], response_format="verbose_json", **{"timestamp_granularities[]": "segment"})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def cli_json(digits_model, recording):
    """`earful transcribe --format json` on the recording (the CLI in this process), parsed."""
    from earful.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["transcribe", "--model", str(digits_model[0]), str(recording[0]), "--format", "json", "--batch-size", "16"])
    assert code == 0, err.getvalue()[-2000:]
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_vad_segments_cover_the_speech_in_order_with_the_models_own_answers(served, recording, verbose):
    path, words, clips, seconds = recording
    segments = verbose["segments"]
    assert verbose["duration"] == pytest.approx(seconds, abs=1e-3) and verbose["language"] == "english"
    assert [s["id"] for s in segments] == list(range(len(segments)))
    starts_ends = [(s["start"], s["end"]) for s in segments]
    assert all(0 <= a < b <= seconds for a, b in starts_ends)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(starts_ends, starts_ends[1:]))  # in order, never overlapping
    # Each digit is its own segment (the pauses are longer than the VAD's minimum silence): the segment
    # holds most of the digit's clip (a clip's quiet ends, a trailing "s", may fall outside).
    assert len(segments) == N_DIGITS
    held = [(min(b, s["end"]) - max(a, s["start"])) / (b - a) for s, (_, a, b) in zip(segments, words)]
    assert min(held) > 0.7 and np.mean(held) > 0.95, held
    # Each segment's text is what the model says of that digit's clip alone.
    from earful.serve.engine import DecodingOptions

    futures = [served.lm.submit([{"role": "user", "content": [{"audio": c}]}], DecodingOptions(max_new_tokens=128))[0] for c in clips]
    alone = [f.result().text for f in futures]
    agree = sum(s["text"] == a for s, a in zip(segments, alone))
    assert agree >= 0.9 * N_DIGITS, [(s["text"], a) for s, a in zip(segments, alone) if s["text"] != a]
    assert verbose["text"] == " ".join(s["text"] for s in segments if s["text"])
    assert all(s["tokens"] and s["temperature"] == 0.0 and s["seek"] == round(s["start"] * 100) for s in segments)
    assert verbose["usage"] == {"type": "duration", "seconds": int(np.ceil(seconds))}
    # earful.load().transcribe takes the long recording too (a path, or the waveform itself): the same text.
    assert served.lm.transcribe(path) == verbose["text"]
    assert served.lm.transcribe(sf.read(path, dtype="float32")) == verbose["text"]


SRT_CUE = re.compile(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+?)\n\n", re.S)
VTT_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})\n(.+?)\n\n", re.S)


def _ms(h, m, s, ms) -> int:
    return ((int(h) * 60 + int(m)) * 60 + int(s)) * 1000 + int(ms)


def parse_srt(text: str) -> list[tuple[int, int, str]]:
    cues = SRT_CUE.findall(text)
    assert "".join(m.group(0) for m in SRT_CUE.finditer(text)) == text, "text outside SRT cues"
    assert [int(c[0]) for c in cues] == list(range(1, len(cues) + 1))
    return [(_ms(*c[1:5]), _ms(*c[5:9]), c[9]) for c in cues]


def parse_vtt(text: str) -> list[tuple[int, int, str]]:
    assert text.startswith("WEBVTT\n\n")
    body = text.removeprefix("WEBVTT\n\n")
    assert "".join(m.group(0) for m in VTT_CUE.finditer(body)) == body, "text outside WebVTT cues"
    return [(_ms(*c[0:4]), _ms(*c[4:8]), c[8]) for c in VTT_CUE.findall(body)]


def test_cli_json_srt_vtt_parse_and_agree_with_the_server(cli_json, verbose, recording):
    """The CLI and the server cut the recording alike (the same VAD on the same decode) and say the same."""
    assert cli_json["file"] == str(recording[0]) and cli_json["duration"] == verbose["duration"]
    cli, srv = cli_json["segments"], verbose["segments"]
    assert [(s["start"], s["end"]) for s in cli] == [(s["start"], s["end"]) for s in srv]
    assert sum(a["text"] == b["text"] for a, b in zip(cli, srv)) >= 0.9 * len(cli)  # batches pad differently
    t = Transcript(cli_json["duration"], [Segment(s["id"], s["start"], s["end"], s["text"]) for s in cli])
    spoken = [(round(s["start"] * 1000), round(s["end"] * 1000), s["text"]) for s in cli if s["text"]]
    assert parse_srt(to_srt(t)) == spoken == parse_vtt(to_vtt(t))
    assert json.loads(to_json(t, cli_json["file"])) == cli_json
    assert cli_json["text"] == " ".join(c[2] for c in spoken)


def test_server_formats_and_bad_values(served, recording):
    clip = FSDD_REC / "4_jackson_3.wav"  # a short clip: the path every transcription took before
    said = served.lm.transcribe(clip, max_new_tokens=128)
    assert served.transcribe(clip, response_format="text").text == said + "\n"
    seconds = sf.info(clip).duration
    end = round(seconds * 1000)
    assert parse_srt(served.transcribe(clip, response_format="srt").text) == [(0, end, said)]
    assert parse_vtt(served.transcribe(clip, response_format="vtt").text) == [(0, end, said)]
    v = served.transcribe(clip, response_format="verbose_json").json()
    assert v["text"] == said and [(s["id"], s["start"], s["text"]) for s in v["segments"]] == [(0, 0.0, said)]
    for form, field in (({"response_format": "xml"}, "response_format"),
                        ({"response_format": "verbose_json", "timestamp_granularities[]": "word"}, "timestamp_granularities[]"),
                        ({"response_format": "verbose_json", "timestamp_granularities[]": "phoneme"}, "timestamp_granularities[]"),
                        ({"response_format": "json", "timestamp_granularities[]": "segment"}, "timestamp_granularities[]")):
        r = served.transcribe(clip, **form)
        assert r.status_code == 400 and r.json()["error"]["param"] == field and field in r.json()["error"]["message"], r.text


def test_server_refuses_a_recording_over_its_request_limit_from_the_header(served, recording, tmp_path):
    path, seconds = _twice(recording, tmp_path)  # ~166 s, over the 100 s a request may hold
    started = time.perf_counter()
    r = served.transcribe(path, response_format="verbose_json")
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert f"{seconds:.1f} s" in r.json()["error"]["message"] and "100" in r.json()["error"]["message"]
    assert time.perf_counter() - started < 5  # refused from the header: nothing decoded or transcribed


def test_a_file_over_the_hard_limit_is_one_line_and_exit_status_2(digits_model, recording, capsys):
    from earful.cli import main

    code = main(["transcribe", "--model", str(digits_model[0]), str(recording[0]), "--max-hours", "0.01"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {recording[0]}: {recording[3]:.1f} s long, more than the limit of 36 s")
    assert "--max-hours" in lines[0] and lines[0].endswith("[AudioTooLong]")


def test_blocks_decode_as_the_whole_file_does(recording, tmp_path):
    """WAV through soundfile's blocks and WebM/Opus through ffmpeg's pipe, block by block, resampled as one stream."""
    from earful.audio import find_ffmpeg, load_audio

    path = recording[0]
    whole = load_audio(path, 16000, max_seconds=None)
    blocks = list(stream_audio(path, 16000, block_seconds=7.0))
    assert len(blocks) > 10 and abs(sum(map(len, blocks)) - len(whole)) <= 2
    joined = np.concatenate(blocks)[: len(whole)]
    assert np.abs(joined - whole[: len(joined)]).max() < 1e-3
    webm = tmp_path / "digits.webm"
    subprocess.run([find_ffmpeg(), "-v", "error", "-i", str(path), "-c:a", "libopus", "-b:a", "24k", str(webm)], check=True)
    whole = load_audio(webm, 16000, max_seconds=None)
    streamed = np.concatenate(list(stream_audio(webm, 16000, block_seconds=7.0)))
    assert abs(len(streamed) - len(whole)) <= 2 and np.abs(streamed[: len(whole)] - whole[: len(streamed)]).max() < 1e-3
    assert stated_seconds(webm) == pytest.approx(recording[3], abs=0.05)


def test_memory_does_not_grow_with_the_length(tiny_lm, recording, tmp_path):
    """Twice the audio, the same peak: a block (here 5 s) and a segment are held, never the file."""
    model, processor = tiny_lm
    generate = texts_of(model, processor, max_new_tokens=1)
    twice, seconds = _twice(recording, tmp_path)
    peaks, counts = [], []
    for path in (recording[0], twice):
        transcribe_long(path, generate, sampling_rate=16000, block_seconds=5.0)  # warm: the VAD model loads once
        tracemalloc.start()
        t = transcribe_long(path, generate, sampling_rate=16000, block_seconds=5.0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        counts.append(len(t.segments))
    assert counts == [N_DIGITS, 2 * N_DIGITS]
    whole = seconds * 16000 * 4  # the longer file as float32 at 16 kHz
    assert peaks[1] < 1.2 * peaks[0] + 256 * 1024 and peaks[1] < 0.5 * whole, (peaks, whole)


def test_fixed_windows_tile_the_recording(tiny_lm, recording):
    model, processor = tiny_lm
    t = transcribe_long(recording[0], texts_of(model, processor, max_new_tokens=1), sampling_rate=16000, split="fixed",
                        segment_seconds=30.0, overlap=2.0)
    bounds = [(s.start, s.end) for s in t.segments]
    assert len(bounds) == 3 and bounds[0][0] == 0 and bounds[-1][1] == pytest.approx(recording[3])
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(bounds, bounds[1:]))  # neighbours meet half-way through the overlap
    assert bounds[0][1] == 29.0 and bounds[1][1] == 57.0


def test_words_shared_at_a_seam_are_kept_once():
    segments = [Segment(0, 0.0, 30.0, "one two three four"), Segment(1, 28.0, 58.0, "three four five"),
                Segment(2, 56.0, 70.0, "six seven")]
    _seam(segments, overlap=2.0)
    assert [s.text for s in segments] == ["one two three four", "five", "six seven"]
    assert [(s.start, s.end) for s in segments] == [(0.0, 29.0), (29.0, 57.0), (57.0, 70.0)]
