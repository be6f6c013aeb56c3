"""Connected digit strings: the preparer's layout (real FSDD words, one speaker a string, seeded),
its CLI errors, and WER that counts every digit as a word."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from earful.audio import load_audio
from earful.data.digit_strings import FADE_SECONDS, SAMPLING_RATE, prepare_digit_strings
from earful.data.fsdd import DIGIT_WORDS
from earful.eval.asr import normalize, normalize_digit_words, word_errors

GAP_MS, EDGE_MS = (40.0, 200.0), (80.0, 150.0)


def rows_of(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


@pytest.fixture(scope="module")
def strings(fsdd, tmp_path_factory):
    """(summary, rows): 6 strings of 2-5 digits for each of two speakers."""
    out = tmp_path_factory.mktemp("strings") / "train.jsonl"
    s = prepare_digit_strings(fsdd, out, ["lucas", "george"], min_digits=2, max_digits=5, count=6, seed=3,
                              gap_ms=GAP_MS, edge_ms=EDGE_MS)
    return s, rows_of(out)


def test_layout_files_rates_texts_and_one_speaker_per_string(fsdd, strings):
    s, rows = strings
    assert s.audio_dir == s.manifest.with_name("train_audio")
    assert Counter(r["speaker"] for r in rows) == {"lucas": 6, "george": 6} == Counter(s.speakers * 6)
    assert len({r["id"] for r in rows}) == 12
    for r in rows:
        path = s.manifest.parent / r["audio"]
        assert path.parent == s.audio_dir and path.is_file()
        info = sf.info(str(path))
        assert info.samplerate == SAMPLING_RATE and info.channels == 1
        assert r["duration"] == pytest.approx(info.frames / info.samplerate, abs=1e-4)
        assert 2 <= len(r["sources"]) <= 5
        assert len(set(r["sources"])) == len(r["sources"])  # 50 recordings a digit: never one twice
        digits = [src.split("_") for src in r["sources"]]
        assert {speaker for _, speaker, _ in digits} == {r["speaker"]}
        assert r["text"] == " ".join(DIGIT_WORDS[int(d)] for d, _, _ in digits) == " ".join(w["word"] for w in r["words"])


def test_duration_is_the_parts_plus_silences_and_the_audio_is_the_recordings(fsdd, strings):
    s, rows = strings
    tolerance = 0.002  # resampling 8 -> 16 kHz rounds each part's length
    for r in rows:
        wave, _ = sf.read(str(s.manifest.parent / r["audio"]), dtype="float32")
        parts = [load_audio(fsdd / "recordings" / f"{src}.wav", SAMPLING_RATE) for src in r["sources"]]
        speech = sum(len(p) for p in parts) / SAMPLING_RATE
        n = len(parts)
        silence = r["duration"] - speech
        assert (n - 1) * GAP_MS[0] / 1000 + 2 * EDGE_MS[0] / 1000 - tolerance <= silence
        assert silence <= (n - 1) * GAP_MS[1] / 1000 + 2 * EDGE_MS[1] / 1000 + tolerance
        ends = [0.0]
        for w, part in zip(r["words"], parts):
            a, b = round(w["start"] * SAMPLING_RATE), round(w["end"] * SAMPLING_RATE)
            assert b - a == len(part) and w["start"] >= ends[-1]
            fade = int(FADE_SECONDS * SAMPLING_RATE)
            # The recording itself (PCM16 rounding aside) between its 5 ms fades, true silence around it.
            np.testing.assert_allclose(wave[a + fade : b - fade], part[fade:-fade], atol=1.5 / 32768)
            assert not wave[round(ends[-1] * SAMPLING_RATE) : a].any()
            ends.append(w["end"])
        assert not wave[round(ends[-1] * SAMPLING_RATE) :].any()


def test_reproducible_with_the_seed_and_per_speaker(fsdd, strings, tmp_path):
    s, rows = strings
    again = prepare_digit_strings(fsdd, tmp_path / "again.jsonl", ["lucas", "george"], min_digits=2, max_digits=5, count=6,
                                  seed=3, gap_ms=GAP_MS, edge_ms=EDGE_MS)
    rows2 = rows_of(again.manifest)
    assert [(r["text"], r["sources"], r["duration"]) for r in rows2] == [(r["text"], r["sources"], r["duration"]) for r in rows]
    assert (again.audio_dir / "lucas_00003.wav").read_bytes() == (s.audio_dir / "lucas_00003.wav").read_bytes()
    # A speaker's strings do not depend on who else is prepared with it.
    alone = rows_of(prepare_digit_strings(fsdd, tmp_path / "alone.jsonl", ["george"], min_digits=2, max_digits=5, count=6,
                                          seed=3, gap_ms=GAP_MS, edge_ms=EDGE_MS).manifest)
    assert [r["sources"] for r in alone] == [r["sources"] for r in rows if r["speaker"] == "george"]
    other = rows_of(prepare_digit_strings(fsdd, tmp_path / "other.jsonl", ["george"], min_digits=2, max_digits=5, count=6,
                                          seed=4, gap_ms=GAP_MS, edge_ms=EDGE_MS).manifest)
    assert [r["sources"] for r in other] != [r["sources"] for r in alone]


def test_repeats_occur_at_their_natural_rate_and_recordings_are_used_evenly(fsdd, tmp_path):
    s = prepare_digit_strings(fsdd, tmp_path / "m.jsonl", ["jackson"], min_digits=7, max_digits=7, count=60, seed=0)
    rows = rows_of(s.manifest)
    assert len(rows) == 60 and all(len(r["sources"]) == 7 for r in rows)
    words = [r["text"].split() for r in rows]
    repeats = sum(any(a == b for a, b in pairwise(w)) for w in words)
    assert repeats == s.with_repeat
    assert 12 <= repeats <= 45  # 1 - 0.9**6 = 47 % of 7-digit strings hold a repeat: ~28 of 60
    assert max(Counter(src for r in rows for src in r["sources"]).values()) <= 2  # ~42 draws a digit, 50 recordings each


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "earful", "data", "prepare", "fsdd-strings", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def test_cli_writes_the_strings_and_a_summary(fsdd, tmp_path):
    r = cli(fsdd, "--out", "s.jsonl", "--speakers", "nicolas", "--count", "3", "--min", "1", "--max", "2",
            "--gap-ms", "0,10", "--audio-dir", "wavs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote s.jsonl: 3 strings of 1-2 digits") and "nicolas" in r.stdout
    rows = rows_of(tmp_path / "s.jsonl")
    assert [row["audio"] for row in rows] == [f"wavs/nicolas_0000{i}.wav" for i in range(3)]
    assert all((tmp_path / row["audio"]).is_file() for row in rows)


@pytest.mark.parametrize("args, says", [
    (["{missing}"], "no such folder"),
    (["{fsdd}", "--speakers", "lucas,nobody"], "no recordings of speaker(s) nobody"),
    (["{fsdd}", "--min", "5", "--max", "3"], "--min 5 must be <= --max 3"),
    (["{fsdd}", "--min", "0"], "--min: must be >= 1"),
    (["{fsdd}", "--gap-ms", "300,50"], "--gap-ms: expected 0 <= LO <= HI"),
], ids=["no-folder", "unknown-speaker", "min-above-max", "min-below-one", "gap-reversed"])
def test_cli_bad_input_is_one_line_and_exit_2(fsdd, tmp_path, args, says):
    args = [a.format(missing=tmp_path / "nope", fsdd=fsdd) for a in args]
    r = cli(*args, "--out", "m.jsonl", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "m_audio").exists()


@pytest.mark.parametrize("text", ["417", "4-1-7", "4, 1, 7.", "Four one seven", "four-one-seven!"])
def test_digit_words_spell_every_digit(text):
    assert normalize_digit_words(text) == "four one seven"


def test_digit_words_rewrite_nothing_else():
    assert normalize_digit_words("Oh, double 1 — it's twenty") == "oh double one its twenty"


def test_wer_counts_each_digit_a_word():
    ref = [normalize_digit_words("four one seven")]
    assert word_errors(ref, [normalize_digit_words("417")])["wer"] == 0
    dropped = word_errors(ref, [normalize_digit_words("four one")])
    assert dropped["wer"] == pytest.approx(1 / 3) and (dropped["deletions"], dropped["reference_words"]) == (1, 3)
    inserted = word_errors([normalize_digit_words("one one")], [normalize_digit_words("1 1 1")])
    assert (inserted["insertions"], inserted["substitutions"], inserted["wer"]) == (1, 0, 0.5)
    # Why: Whisper's normaliser makes the whole string one word, so a wrong digit is "1 of 1" at best.
    assert normalize("four one seven") == "417"


def test_eval_asr_takes_the_digit_normaliser():
    from earful.cli._parser import build_parser

    args = build_parser().parse_args(["eval", "asr", "--model", "m", "--data", "d.jsonl", "--out", "r.json", "--normalize", "digits"])
    assert args.normalize == "digits"


def test_evaluate_asr_counts_digit_words_with_the_digits_normaliser(tiny_lm, strings):
    from earful.data.manifest import Utterance
    from earful.eval.asr import evaluate_asr

    model, processor = tiny_lm
    s, rows = strings
    # References written as numerals ("5307"): one word each to Whisper's normaliser, one per digit here.
    utts = [Utterance(audio=str(s.manifest.parent / r["audio"]), text="".join(src[0] for src in r["sources"]), id=r["id"])
            for r in rows[:2]]
    digits = sum(len(u.text) for u in utts)
    report = evaluate_asr(model, processor, utts, max_new_tokens=3, normalizer="digits")
    assert report["normalizer"] == "digits" and report["reference_words"] == digits
    assert report["wer"] == pytest.approx((report["substitutions"] + report["deletions"] + report["insertions"]) / digits)
    assert evaluate_asr(model, processor, utts, max_new_tokens=3)["reference_words"] == 2
    with pytest.raises(ValueError, match="normalizer must be one of whisper, digits"):
        evaluate_asr(model, processor, utts, normalizer="english")
