"""The CLI as a user meets it: transcribe / chat / eval on real clips, and one clear line per bad file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from conftest import FSDD_REC
from earful.data.fsdd import fsdd_utterances
from earful.data.manifest import Utterance, write_manifest

from test_data import run_cli


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_dir, whisper_dir):
    import torch
    from transformers import AutoFeatureExtractor, AutoTokenizer

    from conftest import tiny_configs
    from earful.models.build import assemble, save_speech_lm

    tok = AutoTokenizer.from_pretrained(smol_dir)
    enc, txt = tiny_configs(len(tok))
    torch.manual_seed(0)
    model, processor = assemble(enc, txt, tok, AutoFeatureExtractor.from_pretrained(whisper_dir), stack_factor=2, projector_hidden_size=48)
    folder = tmp_path_factory.mktemp("tiny_model") / "m"
    save_speech_lm(model, processor, folder)
    return folder


def bad_files(root):
    """One file per kind of bad input, each with the AudioError subclass it must raise."""
    real = (FSDD_REC / "7_jackson_0.wav").read_bytes()
    files = {}
    files["AudioNotFound"] = root / "missing.wav"
    (root / "empty.wav").write_bytes(b"")
    files["AudioEmpty"] = root / "empty.wav"
    (root / "truncated.wav").write_bytes(real[:20])
    files["AudioCorrupt"] = root / "truncated.wav"
    (root / "notes.wav").write_text("these are meeting notes, not audio\n" * 20)
    files["AudioNotAudio"] = root / "notes.wav"
    nan = np.zeros(8000, dtype=np.float32)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 8000, subtype="FLOAT")
    files["AudioNonFinite"] = root / "nan.wav"
    sf.write(root / "long.wav", np.zeros(8000 * 601, dtype=np.int16), 8000, subtype="PCM_16")
    files["AudioTooLong"] = root / "long.wav"
    return files


@pytest.mark.parametrize("kind", ["AudioNotFound", "AudioEmpty", "AudioCorrupt", "AudioNotAudio", "AudioNonFinite", "AudioTooLong"])
def test_transcribe_reports_each_kind_of_bad_audio_in_one_line(fsdd, tiny_model_dir, tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    # Long files are transcribed long-form; too long is over the hard limit, here 6 minutes (exit status 2).
    limit = ["--max-hours", "0.1"] if kind == "AudioTooLong" else []
    r = run_cli("transcribe", "--model", tiny_model_dir, path, *limit)
    assert r.returncode == (2 if kind == "AudioTooLong" else 1)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and path.name in lines[0] and f"[{kind}]" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert "max_seconds" not in r.stderr  # no advice to raise an option transcribe does not have


def fsdd_recording(path, seconds: float):
    """Real speech of a given length: jackson's FSDD digits one after another, cut to `seconds` (8 kHz WAV)."""
    waves, total = [], 0
    for f in sorted(FSDD_REC.glob("*_jackson_*.wav")):
        wave, rate = sf.read(f, dtype="float32")
        waves.append(wave)
        total += len(wave)
        if total >= seconds * rate:
            break
    sf.write(path, np.concatenate(waves)[: int(seconds * rate)], rate, subtype="PCM_16")
    return path


def fsdd_cut(path, n_samples: int):
    """The first `n_samples` of a real FSDD clip (8 kHz): 100 samples are 12.5 ms."""
    wave, rate = sf.read(FSDD_REC / "7_jackson_0.wav", dtype="float32")
    sf.write(path, wave[:n_samples], rate, subtype="PCM_16")
    return path


TOO_LONG = " s long; this model's encoder (whisper) takes at most 30.0 s; split it with `earful data segment`"


def test_transcribe_takes_long_files_whole_and_refuses_what_the_encoder_cannot_read(fsdd, tiny_model_dir, tmp_path):
    """Whisper reads 30 s: a 31 s or 60 s file is transcribed long-form (never cut to its first 30 s),
    in order with the rest of the batch, a 29 s file included; a 100-sample clip is refused."""
    f31, f60, f29 = (fsdd_recording(tmp_path / f"rec{n}s.wav", n) for n in (31, 60, 29))
    short, good = fsdd_cut(tmp_path / "cut100.wav", 100), FSDD_REC / "3_george_1.wav"
    r = run_cli("transcribe", "--model", tiny_model_dir, f31, short, f29, f60, good, "--batch-size", "4")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [line.split("\t")[0] for line in r.stdout.splitlines()] == [str(f31), str(f29), str(f60), str(good)]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(f"error: {short}: 200 samples") and errors[0].endswith("[AudioTooShort]"), errors
    assert "max_seconds" not in r.stderr  # transcribe has no such option to raise


def test_transcribe_goes_on_past_a_bad_file(fsdd, tiny_model_dir, tmp_path):
    bad = bad_files(tmp_path)["AudioCorrupt"]
    good = FSDD_REC / "3_george_1.wav"
    r = run_cli("transcribe", "--model", tiny_model_dir, bad, good)
    assert r.returncode == 1
    assert r.stdout.startswith(f"{good}\t") and "truncated.wav" in r.stderr


def test_chat_answers_about_a_clip(fsdd, tiny_model_dir):
    r = run_cli("chat", "--model", tiny_model_dir, "--audio", FSDD_REC / "5_nicolas_4.wav", "--prompt", "Which digit is this?", "--max-new-tokens", "3", "--num-beams", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    # The CLI's answer is the model's own: the prompt laid out audio first, beam search as asked.
    from earful.audio import load_audio
    from earful.eval.asr import generate_text
    from earful.models.build import load_speech_lm

    lm, processor = load_speech_lm(tiny_model_dir)
    wave = load_audio(FSDD_REC / "5_nicolas_4.wav", processor.sampling_rate)
    expected = generate_text(lm, processor, [wave], "<|audio|>\nWhich digit is this?", max_new_tokens=3, num_beams=2)[0]
    assert r.stdout == expected + "\n"


def test_eval_asr_report_with_a_reject(fsdd, tiny_model_dir, tmp_path):
    rows = [u for u in fsdd_utterances(fsdd, ["nicolas"]) if u.id.endswith("_0")]
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00")
    rows.append(Utterance(audio=str(tmp_path / "broken.wav"), text="one"))
    write_manifest(rows, tmp_path / "m.jsonl")
    r = run_cli("eval", "asr", "--model", tiny_model_dir, "--data", tmp_path / "m.jsonl", "--out", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 10 and report["rejected"] == 1
    assert report["rejects"][0]["error"] == "AudioCorrupt"
    assert report["cer"] > 0 and report["wer"] >= 0.5  # an untrained model does not read digits
    assert {"id", "reference", "hypothesis", "correct"} <= set(report["utterances"][0])


def test_eval_asr_transcribes_long_recordings_and_records_clips_too_short(fsdd, tiny_model_dir, tmp_path):
    rows = [Utterance(audio=str(fsdd_recording(tmp_path / "rec31s.wav", 31)), text="seven", id="long31"),
            Utterance(audio=str(fsdd_recording(tmp_path / "rec29s.wav", 29)), text="seven", id="long29"),
            Utterance(audio=str(fsdd_cut(tmp_path / "cut100.wav", 100)), text="seven", id="cut100"),
            Utterance(audio=str(FSDD_REC / "7_jackson_0.wav"), text="seven", id="good")]
    write_manifest(rows, tmp_path / "m.jsonl")
    r = run_cli("eval", "asr", "--model", tiny_model_dir, "--data", tmp_path / "m.jsonl", "--out", tmp_path / "report.json", "--batch-size", "4")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 3 and [u["id"] for u in report["utterances"]] == ["long31", "long29", "good"]
    assert report["utterances"][0]["segments"] and "segments" not in report["utterances"][1]  # 31 s: long-form
    rejects = {x["id"]: x for x in report["rejects"]}
    assert report["rejected"] == 1 and set(rejects) == {"cut100"}
    assert rejects["cut100"]["error"] == "AudioTooShort" and "needs at least 201" in rejects["cut100"]["reason"]


def test_data_encode_rejects_a_clip_longer_than_the_encoder_takes(fsdd, tiny_model_dir, tmp_path):
    """A 60 s clip used to be stored as 1,500 frames (its first 30 s) under a row saying 60 s."""
    rows = [Utterance(audio=str(fsdd_recording(tmp_path / "rec60s.wav", 60)), text="x", id="long60"),
            Utterance(audio=str(fsdd_recording(tmp_path / "rec29s.wav", 29)), text="x", id="long29")]
    write_manifest(rows, tmp_path / "m.jsonl")
    r = run_cli("data", "encode", "--data", tmp_path / "m.jsonl", "--encoder", tiny_model_dir, "--out", tmp_path / "store")
    assert r.returncode == 0, r.stderr[-3000:]
    index = [json.loads(line) for line in (tmp_path / "store" / "index.jsonl").read_text().splitlines()]
    rejects = [json.loads(line) for line in (tmp_path / "store" / "rejects.jsonl").read_text().splitlines()]
    assert [(x["id"], x["frames"]) for x in index] == [("long29", 1450)]  # 29 s at 50 Hz, whole
    assert [(x["id"], x["error"], x["reason"]) for x in rejects] == [("long60", "AudioTooLong", f"60.0{TOO_LONG}")]


def test_normaliser_matches_numerals_and_words():
    from earful.eval.asr import normalize

    assert normalize("Seven.") == normalize("7") == normalize("seven")
    assert normalize("Three hundred and twelve!") == normalize("312")
    assert normalize("zero") != normalize("nine")


def test_help_explains_every_verb():
    r = run_cli("--help")
    assert r.returncode == 0 and all(v in r.stdout for v in ("data", "train", "eval", "transcribe", "chat"))
    r = run_cli("train", "--help")
    assert "--set" in r.stdout and "--resume" in r.stdout
