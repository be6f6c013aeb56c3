"""Bad settings as a user types them: every one is refused before any work, in one line, exit 2, no traceback.

Recipe values go through `earful.cli.main` (what `python -m earful` runs) in this process, since the
check happens before any model loads; one real `python -m earful train` process takes them all at once.
CLI options are refused by argparse in a real process that starts in a fraction of a second.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT
from earful.cli import main
from earful.errors import EarfulError

from test_data import run_cli

DIGITS = ROOT / "recipes" / "digits.yaml"

# key=value, and what the one line must say besides the key.
BAD_RECIPE_VALUES = [
    ("train.log_every=0", "must be >= 1, found 0"),
    ("model.stack_factor=0", "must be >= 1, found 0"),
    ("train.lr=.nan", "must be > 0, found nan"),
    ("train.lr=-1e-3", "must be > 0"),
    ("train.device=bogus", "expected auto, cpu, cuda or cuda:N, found 'bogus'"),
    ("model.lora_dropout=1.5", "within [0, 1)"),
    ("train.warmup_steps=-5", "must be >= 0, found -5"),
    ("model.projector_hidden_size=0", "must be >= 1, found 0"),
    ("train.save_every=-1", "must be >= 0"),
    ("train.eval_every=-1", "must be >= 0"),
    ("train.max_grad_norm=0", "must be > 0"),
    ("train.weight_decay=.inf", "must be >= 0, found inf"),
    ("train.seed=-1", "within [0, 2**32)"),
    ("train.num_threads=0", "must be >= 1"),
    ("model.lora_r=0", "must be >= 1"),
    ("data.max_seconds=0", "must be > 0"),
    ("train.dpo_beta=0", "must be > 0"),
    ("train.max_mc_accuracy_drop=2", "within [0, 1]"),
]


def _main(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("pair,says", BAD_RECIPE_VALUES, ids=[p for p, _ in BAD_RECIPE_VALUES])
def test_train_refuses_a_bad_recipe_value_in_one_line(capsys, tmp_path, pair, says):
    code, err = _main(capsys, "train", DIGITS, "--out", tmp_path / "run", "--set", pair)
    key = pair.split("=")[0]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {DIGITS}: {key}: ") and says in lines[0], err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_train_reports_every_bad_value_at_once_from_a_real_process(tmp_path):
    r = run_cli("train", DIGITS, "--out", tmp_path / "run", "--set", *(p for p, _ in BAD_RECIPE_VALUES))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    keys = {p.split("=")[0] for p, _ in BAD_RECIPE_VALUES}
    assert f"{len(keys)} problems:" in r.stderr
    assert all(f"  - {k}: " in r.stderr for k in keys), r.stderr


@pytest.mark.parametrize("argv,says", [
    (["--set", "x=[1,"], "--set 'x=[1,': the value is not valid YAML"),
    (["--set", "train.=3"], "an empty name"),
    (["--set", "train=3", "train.lr=1"], "train was set to a value"),
])
def test_train_refuses_a_malformed_override_in_one_line(capsys, tmp_path, argv, says):
    code, err = _main(capsys, "train", DIGITS, "--out", tmp_path / "run", *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


def test_train_refuses_a_recipe_that_is_not_utf8(capsys, tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(DIGITS.read_text().replace("You transcribe speech.", "Vous transcrivez la parole, très bien.").encode("latin-1"))
    code, err = _main(capsys, "train", bad, "--out", tmp_path / "run")
    assert code == 2 and err.startswith(f"error: {bad}: not UTF-8 text") and len(err.strip().splitlines()) == 1, err


def test_train_names_a_bad_audio_tokenizer_without_a_traceback(tmp_path):
    """AudioTokenizerError (like SoundVocabError, every EarfulError) is one line at the CLI, exit 2."""
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "notes.json").write_text("{}")
    (tmp_path / "m.jsonl").write_text("")
    r = run_cli("train", ROOT / "recipes" / "units_continuation.yaml", "--out", tmp_path / "run",
                "--set", f"model.audio_tokenizer={tmp_path / 'tok'}", f"data.train={tmp_path / 'm.jsonl'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'tok'}: not an audio tokenizer folder")


def test_a_recipe_that_trains_nothing_is_one_line(fsdd, tmp_path):
    """Found only once the model is built (what each part freezes), yet still a RecipeError: one line, exit 2."""
    from earful.data.fsdd import fsdd_utterances
    from earful.data.manifest import write_manifest

    write_manifest(fsdd_utterances(fsdd, ["george"])[:2], tmp_path / "m.jsonl")
    r = run_cli("train", DIGITS, "--out", tmp_path / "run", "--set", f"data.train={tmp_path / 'm.jsonl'}", "data.eval=null",
                "model.lora=null", "model.freeze_projector=true")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == "error: every part is frozen: unfreeze the projector, encoder or decoder in the recipe"


# Each verb with a bad number; no model or file is needed, since argparse refuses it first.
BAD_OPTIONS = [
    (["transcribe", "--model", "M", "a.wav", "--batch-size", "-1"], "--batch-size", "must be >= 1, found -1"),
    (["transcribe", "--model", "M", "a.wav", "--batch-size", "0"], "--batch-size", "must be >= 1, found 0"),
    (["eval", "asr", "--model", "M", "--data", "d", "--out", "o", "--batch-size", "-1"], "--batch-size", "must be >= 1"),
    (["eval", "asr", "--model", "M", "--data", "d", "--out", "o", "--limit", "0"], "--limit", "must be >= 1, found 0"),
    (["eval", "asr", "--model", "M", "--data", "d", "--out", "o", "--limit", "x"], "--limit", "expected a whole number"),
    (["eval", "units-asr", "--model", "M", "--data", "d", "--out", "o", "--limit", "0"], "--limit", "must be >= 1"),
    (["eval", "pairs", "--model", "M", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size", "must be >= 1"),
    (["chat", "--model", "M", "--audio", "a.wav", "--num-beams", "0"], "--num-beams", "must be >= 1, found 0"),
    (["chat", "--model", "M", "--audio", "a.wav", "--max-new-tokens", "0"], "--max-new-tokens", "must be >= 1"),
    (["chat", "--model", "M", "--audio", "a.wav", "--sample", "--temperature", "0"], "--temperature", "must be > 0, found 0"),
    (["chat", "--model", "M", "--audio", "a.wav", "--temperature", "nan"], "--temperature", "expected a finite number"),
    (["generate", "--model", "M", "--audio", "a.wav", "--out", "o.json", "--top-k", "0"], "--top-k", "must be >= 1"),
    (["data", "encode", "--data", "d", "--encoder", "e", "--out", "o", "--batch-size", "0"], "--batch-size", "must be >= 1"),
    (["data", "encode", "--data", "d", "--encoder", "e", "--out", "o", "--max-seconds", "-5"], "--max-seconds", "must be > 0"),
    (["data", "ingest", "s", "--out", "o", "--min-seconds", "-1"], "--min-seconds", "must be >= 0"),
    (["data", "ingest", "s", "--out", "o", "--silence-dbfs", "10"], "--silence-dbfs", "must be <= 0"),
    (["data", "segment", "s", "--out", "o", "--seconds", "0"], "--seconds", "must be > 0"),
    (["data", "synth", "--out", "o", "--text", "t", "--limit", "0"], "--limit", "must be >= 1"),
    (["data", "prepare", "tts-digits", "o", "--per-digit", "0"], "--per-digit", "must be >= 1"),
    (["units", "fit", "--data", "d", "--k", "100", "--out", "o", "--layer", "0"], "--layer", "must be >= 1"),
]


@pytest.mark.parametrize("argv,option,says", BAD_OPTIONS, ids=[" ".join(a[:2]) + " " + o for a, o, _ in BAD_OPTIONS])
def test_a_bad_number_is_one_line_and_exit_2(tmp_path, argv, option, says):
    r = run_cli(*argv, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: earful ") and f"argument {option}: {says}" in lines[0], r.stderr


def test_a_voice_nobody_has_is_one_line_before_the_model_loads(capsys):
    code, err = _main(capsys, "chat", "--model", "M", "--audio", "a.wav", "--speak-to", "x.wav", "--voice", "nobody:x")
    assert code == 2 and err.startswith("error: no voice 'nobody:x'") and "piper:joe" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv", [
    ["transcribe", "--model", "M", "a.wav", "--prompt", "What is said?"],
    ["eval", "asr", "--model", "M", "--data", "d.jsonl", "--out", "o.json", "--prompt", "<|audio|> and <|audio|>"],
    ["chat", "--model", "M", "--audio", "a.wav", "--prompt", "<|audio|> or <|audio|>"],
], ids=["transcribe", "eval asr", "chat"])
def test_a_prompt_without_one_audio_placeholder_is_one_line(capsys, argv):
    """It used to reach the processor's ValueError, a traceback, after the model had loaded."""
    code, err = _main(capsys, *argv)
    assert code == 2 and err.startswith("error: --prompt: ") and "<|audio|>" in err and len(err.strip().splitlines()) == 1, err


def test_an_output_path_the_system_refuses_is_one_line(capsys, fsdd, tmp_path):
    """--out naming a folder, or a path under a file: an OSError, reported like any user error."""
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "7_jackson_0.wav").write_bytes((fsdd / "recordings" / "7_jackson_0.wav").read_bytes())
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "rec", tmp_path / "a_file" / "m.jsonl"):
        code, err = _main(capsys, "data", "prepare", "fsdd", tmp_path / "rec", "--out", out)
        assert code == 2 and err.startswith("error: [Errno ") and len(err.strip().splitlines()) == 1, err


def test_ingest_min_seconds_above_max_seconds_is_an_error(capsys, tmp_path):
    code, err = _main(capsys, "data", "ingest", tmp_path, "--out", tmp_path / "o", "--min-seconds", "5", "--max-seconds", "2")
    assert code == 2 and "--min-seconds 5 must be less than --max-seconds 2" in err


def test_length_limits_of_each_encoder(whisper_dir):
    """Whisper takes 30.0 s and at least n_fft/2 + 1 samples; wav2vec2 has no upper limit and needs its receptive field."""
    from transformers import AutoFeatureExtractor, Wav2Vec2Config, Wav2Vec2FeatureExtractor, WhisperConfig

    from earful.audio import AudioTooLong, AudioTooShort
    from earful.models.processing import clip_features, max_audio_seconds, min_audio_samples

    fe, whisper = AutoFeatureExtractor.from_pretrained(whisper_dir), WhisperConfig()
    assert max_audio_seconds(fe, whisper) == 30.0 and min_audio_samples(fe, whisper) == 201
    assert clip_features(fe, whisper, np.zeros(30 * 16000, np.float32)).shape == (80, 3000)
    assert clip_features(fe, whisper, np.zeros(201, np.float32)).shape == (80, 1)
    with pytest.raises(AudioTooLong, match=r"clip\.wav: 30\.0 s long; this model's encoder \(whisper\) takes at most 30\.0 s"):
        clip_features(fe, whisper, np.zeros(30 * 16000 + 1, np.float32), "clip.wav")
    with pytest.raises(AudioTooShort, match="200 samples"):
        clip_features(fe, whisper, np.zeros(200, np.float32))
    w2v_fe, w2v = Wav2Vec2FeatureExtractor(), Wav2Vec2Config()
    assert max_audio_seconds(w2v_fe, w2v) is None and min_audio_samples(w2v_fe, w2v) == 400
    assert clip_features(w2v_fe, w2v, np.zeros(31 * 16000, np.float32)).shape == (31 * 16000,)
    with pytest.raises(AudioTooShort):
        clip_features(w2v_fe, w2v, np.zeros(399, np.float32))
    assert issubclass(AudioTooLong, EarfulError)
