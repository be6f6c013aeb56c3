"""Manifests, the FSDD preparer (real recordings), recipes and length-grouped batches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from earful.data.dataset import infinite_batches, length_grouped_batches
from earful.data.manifest import ManifestError, Utterance, read_manifest, write_manifest
from earful.train.recipe import RecipeError, load_recipe

from conftest import ROOT, SPEAKERS


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "earful", *map(str, args)], capture_output=True, text=True, **kw)


def test_prepare_fsdd_from_the_cli(fsdd, tmp_path):
    out = tmp_path / "m" / "train.jsonl"
    r = run_cli("data", "prepare", "fsdd", fsdd, "--out", out, "--speakers", "george,lucas")
    assert r.returncode == 0, r.stderr
    rows = read_manifest(out)
    assert len(rows) == 1000 and {u.speaker for u in rows} == {"george", "lucas"}
    seven = next(u for u in rows if u.id == "7_lucas_3")
    assert seven.text == "seven" and 0.1 < seven.duration < 2.0
    # Paths are stored relative to the manifest and come back absolute and real.
    raw = json.loads(out.read_text().splitlines()[0])
    assert not raw["audio"].startswith("/")
    assert all(__import__("os").path.isfile(u.audio) for u in rows[:20])


def test_prepare_fsdd_all_speakers_and_a_missing_one(fsdd, tmp_path):
    r = run_cli("data", "prepare", "fsdd", fsdd, "--out", tmp_path / "all.jsonl")
    assert r.returncode == 0 and len(read_manifest(tmp_path / "all.jsonl")) == 500 * len(SPEAKERS)
    r = run_cli("data", "prepare", "fsdd", fsdd, "--out", tmp_path / "x.jsonl", "--speakers", "george,nobody")
    assert r.returncode == 2
    assert "nobody" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_manifest_errors_name_the_line(tmp_path):
    m = tmp_path / "bad.jsonl"
    m.write_text('{"audio": "a.wav", "text": "one"}\n{"text": "no audio"}\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: each line needs an 'audio' path"):
        read_manifest(m)
    m.write_text('{"audio": "a.wav"}\nnot json\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: not JSON"):
        read_manifest(m)
    m.write_text("\n")
    with pytest.raises(ManifestError, match="no utterances"):
        read_manifest(m)


def test_manifest_write_is_atomic_and_round_trips(tmp_path):
    rows = [Utterance(audio=str(tmp_path / "a.wav"), text="one", speaker="s", duration=0.5, prompt="Say <|audio|>", response="1")]
    write_manifest(rows, tmp_path / "m.jsonl")
    assert read_manifest(tmp_path / "m.jsonl") == rows

    def broken():
        yield rows[0]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_manifest(broken(), tmp_path / "m.jsonl")
    assert read_manifest(tmp_path / "m.jsonl") == rows  # the old manifest is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temp file left


def test_length_grouped_batches_cover_everything_once_and_group_lengths():
    lengths = [float(i % 97) for i in range(1000)]
    batches = length_grouped_batches(lengths, 16, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    assert batches == length_grouped_batches(lengths, 16, seed=3)  # deterministic
    assert batches != length_grouped_batches(lengths, 16, seed=4)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches would spread over ~90
    # Resuming mid-epoch yields exactly the batches an uninterrupted run would.
    it = infinite_batches(lengths, 16, seed=0)
    straight = [next(it) for _ in range(80)]
    resumed = infinite_batches(lengths, 16, seed=0, start_epoch=straight[70][0], start_batch=straight[70][1])
    assert [next(resumed) for _ in range(10)] == straight[70:80]


def test_recipe_overrides_and_all_problems_at_once(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", ["train.max_steps=3", "data.train=x.jsonl", "model.system_prompt=null"])
    assert recipe.train.max_steps == 3 and recipe.data.train == "x.jsonl" and recipe.model.system_prompt is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  stack_factor: two\ntrain:\n  max_step: 3\n  batch_size: 0\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    msg = str(e.value)
    assert "model.stack_factor" in msg and "train.max_step: unknown key" in msg
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(ROOT / "recipes" / "digits.yaml", ["train.max_steps"])


def test_speed_perturbed_copies(fsdd):
    from earful.data.dataset import SpeechDataset
    from earful.data.fsdd import fsdd_utterances

    utts = fsdd_utterances(fsdd, ["jackson"])[:3]
    ds = SpeechDataset(utts, 16000, "Transcribe the audio: <|audio|>", speeds=(0.9, 1.0, 1.1))
    assert len(ds) == 9 and ds.utterance(7) is utts[1]
    slow, plain, fast = ds[0]["audio"], ds[3]["audio"], ds[6]["audio"]
    assert len(slow) == pytest.approx(len(plain) / 0.9, rel=0.01)
    assert len(fast) == pytest.approx(len(plain) / 1.1, rel=0.01)
    assert ds[6]["response"] == ds[0]["response"] == utts[0].text
    assert ds.lengths()[6] == pytest.approx(utts[0].duration / 1.1)


def test_tts_digits_make_a_manifest_of_real_audio(tmp_path):
    # The main job's fallback where FSDD is absent: spoken digits from the bundled Piper voice.
    r = run_cli("data", "prepare", "tts-digits", tmp_path / "tts", "--per-digit", "2", "--seed", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_manifest(tmp_path / "tts" / "manifest.jsonl")
    assert len(rows) == 20 and sorted({u.text for u in rows}) == sorted(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    from earful.audio import load_audio

    for u in rows[:5]:
        audio = load_audio(u.audio, 16000)
        seconds = len(audio) / 16000
        assert 0.2 < seconds < 2.0 and seconds == pytest.approx(u.duration, abs=0.01)
        assert float(abs(audio).max()) > 0.05  # speech, not silence


def test_unusable_clips_are_found_before_training_and_recorded(fsdd, tmp_path):
    """Every clip of a training manifest is decoded up front: a truncated WAV, a text file named
    .wav, a missing file and a clip the encoder cannot take are each left out with their reason;
    only a manifest with no usable clip at all is an error."""
    from earful.audio import AudioTooShort
    from earful.data.dataset import usable_utterances
    from earful.data.fsdd import fsdd_utterances

    good = fsdd_utterances(fsdd, ["jackson"])[:4]
    data = open(good[0].audio, "rb").read()
    (tmp_path / "truncated.wav").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.wav").write_text("a text file, not a recording\n")
    bad = [Utterance(audio=str(tmp_path / n), text="x", id=n) for n in ("truncated.wav", "notes.wav", "missing.wav")]
    rows = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3]]

    def no_first(n_samples, name):  # a model-side check, as the encoder's length limits are
        if name == good[3].audio:
            raise AudioTooShort(name, "too short for this encoder")

    kept, rejects = usable_utterances(rows, 16000, 30.0, "m.jsonl", no_first)
    assert kept == good[:3]
    assert [(r["id"], r["error"]) for r in rejects] == [("truncated.wav", "AudioCorrupt"), ("notes.wav", "AudioNotAudio"),
                                                        ("missing.wav", "AudioNotFound"), (good[3].id, "AudioTooShort")]
    assert "truncated WAV" in rejects[0]["reason"] and all(r["manifest"] == "m.jsonl" for r in rejects)
    with pytest.raises(ManifestError, match=r"m.jsonl: none of its 3 clips is usable \(e.g. .*truncated.wav: truncated WAV"):
        usable_utterances(bad, 16000, 30.0, "m.jsonl")
