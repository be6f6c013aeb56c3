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
    r = run_cli("transcribe", "--model", tiny_model_dir, path)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and path.name in lines[0] and f"[{kind}]" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_transcribe_goes_on_past_a_bad_file(fsdd, tiny_model_dir, tmp_path):
    bad = bad_files(tmp_path)["AudioCorrupt"]
    good = FSDD_REC / "3_george_1.wav"
    r = run_cli("transcribe", "--model", tiny_model_dir, bad, good)
    assert r.returncode == 1
    assert r.stdout.startswith(f"{good}\t") and "truncated.wav" in r.stderr


def test_chat_answers_about_a_clip(fsdd, tiny_model_dir):
    r = run_cli("chat", "--model", tiny_model_dir, "--audio", FSDD_REC / "5_nicolas_4.wav", "--prompt", "Which digit is this?", "--max-new-tokens", "3", "--num-beams", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.endswith("\n") and len(r.stdout.splitlines()) >= 1


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
    assert 0 <= report["cer"] and report["wer"] >= 0.5  # an untrained model does not read digits
    assert {"id", "reference", "hypothesis", "correct"} <= set(report["utterances"][0])


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
