"""Non-speech clips (earful.data.nonspeech): what a listening LM must learn to refuse, not transcribe."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import fsdd_clip

from earful.audio import load_audio
from earful.data.dataset import response_of
from earful.data.manifest import json_lines, read_manifest
from earful.data.nonspeech import KINDS, MIN_SAMPLES, make_nonspeech, nonspeech_kind_of

ANSWER = "I could not hear any speech."
PER_KIND = 10


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("nonspeech")
    return out, make_nonspeech(out, PER_KIND * len(KINDS), seed=0, answer=ANSWER)


def _peak_dbfs(wave: np.ndarray) -> float:
    peak = float(np.abs(wave).max())
    return 20 * np.log10(peak) if peak > 0 else -np.inf


def test_clips_go_evenly_over_every_kind(clips, tmp_path):
    _, rows = clips
    assert Counter(nonspeech_kind_of(u.id) for u in rows) == {k: PER_KIND for k in KINDS}
    uneven = Counter(nonspeech_kind_of(u.id) for u in make_nonspeech(tmp_path, 30))
    assert set(uneven) == set(KINDS) and max(uneven.values()) - min(uneven.values()) == 1 and sum(uneven.values()) == 30
    variants = {r["variant"] for _, r in json_lines(clips[0] / "manifest.jsonl", "manifest")}
    for wanted in ("digital-zero", "room-tone", "white-noise", "pink-noise", "brown-noise", "dtmf", "melody", "chord"):
        assert wanted in variants, f"{wanted} not drawn in {len(rows)} clips: {sorted(variants)}"


def test_every_clip_is_valid_audio_of_the_asked_length_rate_and_level(clips):
    _, rows = clips
    for u in rows:
        info = sf.info(u.audio)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        wave = load_audio(u.audio, 16000)  # earful's own checks: decodable, finite, not empty
        assert MIN_SAMPLES <= len(wave) and 0.3 <= len(wave) / 16000 <= 2.5
        assert u.duration == pytest.approx(len(wave) / 16000, abs=1e-4)
        peak = _peak_dbfs(wave)
        if nonspeech_kind_of(u.id) == "silence":
            assert peak <= -44.9, (u.id, peak)  # digital zero (-inf) or room tone
        else:
            assert -50.1 <= peak <= -2.9, (u.id, peak)  # audible, never clipped
    peaks = [_peak_dbfs(load_audio(u.audio)) for u in rows if nonspeech_kind_of(u.id) != "silence"]
    assert min(peaks) < -40 and max(peaks) > -10  # levels spread over the range, not one setting


def test_the_manifest_says_no_word_was_said_and_carries_the_answer(clips, tmp_path):
    out, rows = clips
    listed = read_manifest(out / "manifest.jsonl")
    assert listed == rows
    for u in listed:
        assert (u.text, u.speaker, u.response, response_of(u)) == ("", "nonspeech", ANSWER, ANSWER)
        assert Path(u.audio).name == f"{u.id}.wav" and Path(u.audio).parent == (out / "audio").resolve()
    kinds = [r["kind"] for _, r in json_lines(out / "manifest.jsonl", "manifest")]
    assert kinds == [nonspeech_kind_of(u.id) for u in rows]
    # Without an answer the target is the empty transcript.
    u = make_nonspeech(tmp_path, 1)[0]
    assert u.response is None and response_of(u) == ""


def test_kind_of_an_id():
    assert nonspeech_kind_of("nonspeech_hum_00002") == "hum"
    for other in ("7_george_12", "nonspeech_speech_00001", "nonspeech_hum", None, ""):
        assert nonspeech_kind_of(other) is None


def test_the_seed_makes_the_clips(tmp_path):
    a = make_nonspeech(tmp_path / "a", 14, seed=5)
    b = make_nonspeech(tmp_path / "b", 14, seed=5)
    assert [Path(u.audio).read_bytes() for u in a] == [Path(u.audio).read_bytes() for u in b]  # byte for byte
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() == (tmp_path / "b" / "manifest.jsonl").read_bytes()
    prefix = make_nonspeech(tmp_path / "prefix", 7, seed=5)  # a smaller count: the first clips of a larger one
    assert [Path(u.audio).read_bytes() for u in prefix] == [Path(u.audio).read_bytes() for u in a[:7]]
    other = make_nonspeech(tmp_path / "c", 14, seed=6)
    differ = sum(Path(u.audio).read_bytes() != Path(v.audio).read_bytes() for u, v in zip(a, other))
    assert differ >= 12  # all but, at most, two digital silences of equal length by chance


@pytest.mark.parametrize("rate", [8000, 22050])
def test_other_sampling_rates(tmp_path, rate):
    for u in make_nonspeech(tmp_path, len(KINDS), sampling_rate=rate, min_seconds=0.1, max_seconds=0.2):
        assert sf.info(u.audio).samplerate == rate
        assert 0.1 * rate - 1 <= len(load_audio(u.audio, rate)) <= 0.2 * rate + 1


def test_settings_that_cannot_work_are_refused_all_at_once(tmp_path):
    with pytest.raises(ValueError) as e:
        make_nonspeech(tmp_path, 0, sampling_rate=4000, min_seconds=3.0, max_seconds=1.0)
    for part in ("count must be >= 1, found 0", "sampling_rate must be >= 8000", "min_seconds <= max_seconds"):
        assert part in str(e.value)
    with pytest.raises(ValueError, match="fewer than 400 samples"):
        make_nonspeech(tmp_path, 1, min_seconds=0.01)


def test_silero_vad_finds_no_speech_in_them(clips, fsdd):
    pytest.importorskip("silero_vad", reason="silero-vad is in earful's [ingest] extra")
    from earful.data.segment import speech_regions

    _, rows = clips
    # The detector hears real speech (so an empty answer below means something): a few FSDD digits.
    for name in ("7_george_3.wav", "0_jackson_10.wav", "8_nicolas_5.wav"):
        assert speech_regions(fsdd_clip(name), min_seconds=0.0), name
    heard = [u.id for u in rows if speech_regions(load_audio(u.audio, 16000), min_seconds=0.0)]
    # Measured: 0 of 70 here (seed 0); 7 of 700 with seed 1, all melodies or a DTMF mixture (a tune is
    # the closest of these to a voice).
    assert len(heard) <= 0.05 * len(rows), heard
    assert not [i for i in heard if nonspeech_kind_of(i) in ("silence", "noise", "hum")], heard


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "earful", "data", "prepare", "nonspeech", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_writes_the_clips_and_says_what_it_wrote(tmp_path):
    r = _cli(tmp_path / "ns", "--count", 14, "--seed", 3, "--answer", ANSWER)
    assert r.returncode == 0, r.stderr
    assert "14 non-speech clips" in r.stdout and all(f"{k} 2" in r.stdout for k in KINDS)
    rows = read_manifest(tmp_path / "ns" / "manifest.jsonl")
    assert len(rows) == 14 and {u.response for u in rows} == {ANSWER}
    assert [Path(u.audio).read_bytes() for u in rows] == [Path(u.audio).read_bytes() for u in make_nonspeech(tmp_path / "lib", 14, seed=3)]


@pytest.mark.parametrize("bad", [["--count", "0"], ["--count", "many"], ["--rate", "100"]])
def test_cli_bad_numbers_are_one_line_and_exit_2(tmp_path, bad):
    r = _cli(tmp_path / "ns", *bad)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert bad[0] in r.stderr or "sampling_rate" in r.stderr
    assert not (tmp_path / "ns" / "manifest.jsonl").exists()
