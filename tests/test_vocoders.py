"""Vocoders: units back to audio a person can hear.

The Piper generator is checked against Piper itself (parity: the same wave from the same z); the
trainable adapters are fitted for a few steps on real FSDD clips (griffin-lim) and on Piper's own
speech (piper-joe), with a small k-means tokenizer over the bundled Whisper tiny.en, to check
shapes, lengths, saving and loading, and the CLI end to end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import FSDD_REC, fsdd_clip
from earful.data.manifest import Utterance, write_manifest
from earful.models.vocab import save_unit_lm
from earful.tokenizers.units import LayerFeatures, UnitTokenizer, fit_kmeans
from earful.vocoders import (GriffinLimVocoder, PiperGenerator, PiperJoeVocoder, PiperSpeaker, UnitsOutOfRange,
                             VocoderError, expand_durations, fit_griffin_lim, fit_piper_joe, load_vocoder,
                             mean_durations)

from earful.vocoders.speaking import VOCODER_DIR, attach_vocoder, load_speaking_unit_lm

from test_data import run_cli
from test_spoken_eval import make_lm

CLIPS = [f"{d}_{s}_0.wav" for d in range(4) for s in ("jackson", "george")]  # 8 clips, ~4 s of speech
K = 8
TINY = {"channels": 32, "blocks": 1, "post_blocks": 1}  # a few thousand parameters: fits in a second


@pytest.fixture(scope="module")
def units_dir(fsdd, tmp_path_factory):
    feats = LayerFeatures("bundled:whisper-tiny.en")
    frames = np.concatenate(feats([fsdd_clip(n) for n in CLIPS]))
    folder = tmp_path_factory.mktemp("units")
    UnitTokenizer(fit_kmeans(frames, K, seed=0), features=feats).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def units(units_dir):
    return UnitTokenizer.from_pretrained(units_dir)


@pytest.fixture(scope="module")
def griffin_lim(units, units_dir):
    return fit_griffin_lim(units, [fsdd_clip(n) for n in CLIPS], steps=200, batch=4, units_folder=units_dir, adapter=TINY)


@pytest.fixture(scope="module")
def speaker():
    pytest.importorskip("onnx", reason="the piper-joe vocoder needs the synth extra (onnx)")
    return PiperSpeaker()


# -- the Piper generator ---------------------------------------------------------------------------
def test_piper_generator_reproduces_pipers_own_audio_from_its_z(speaker):
    z, wave = speaker.speak("The river flows slowly through the valley.")
    assert z.shape[0] == 192 and len(wave) == z.shape[1] * 256  # 86.13 z frames a second at 22050 Hz
    gen = PiperGenerator.from_onnx()
    with torch.no_grad():
        ours = gen(torch.from_numpy(z)[None])[0].numpy()
    assert ours.shape == wave.shape
    assert np.abs(ours - wave).max() < 1e-4  # measured 6.5e-7
    assert np.abs(wave).max() > 0.1  # speech, not silence
    assert np.array_equal(speaker.speak("The river flows slowly through the valley.")[1], wave)  # noise scales 0


def test_piper_joe_fit_decodes_at_22050_hz_and_round_trips(speaker, units, units_dir, tmp_path):
    texts = ["Anna was thirsty after her run.", "She opened the fridge and drank some water.", "The dog saw a cat."]
    voc, report = fit_piper_joe(units, texts, steps=5, stft_steps=2, units_folder=units_dir, batch=2, adapter=TINY)
    assert report["clips"] == 3 and report["stft_loss"] is not None and np.isfinite(report["loss"])
    ids = units.encode(fsdd_clip("5_nicolas_1.wav"), dedup=False)
    wave = voc.decode(ids)
    assert voc.sampling_rate == 22050 and wave.dtype == np.float32 and np.isfinite(wave).all()
    assert abs(len(wave) - len(ids) * 22050 / 50) <= 256  # within one z frame of n units' duration
    voc.save_pretrained(tmp_path / "voc")
    back = load_vocoder(tmp_path / "voc")
    assert isinstance(back, PiperJoeVocoder) and np.array_equal(back.decode(ids), wave)


# -- the trainable adapter, on Griffin-Lim -----------------------------------------------------------
def test_griffin_lim_fit_lowers_the_loss_and_decodes_to_the_right_length(griffin_lim, units):
    voc, report = griffin_lim
    # The adapter starts at the mean log-mel frame (L1 0.98 from it); measured 0.69 after 200 steps.
    assert report["loss"] < 0.85 * report["loss_first"]
    ids = units.encode(fsdd_clip("7_nicolas_3.wav"), dedup=False)  # a speaker the vocoder never heard
    wave = voc.decode(ids)
    assert wave.dtype == np.float32 and np.isfinite(wave).all() and np.abs(wave).max() > 0
    assert voc.frame_rate == 50 and voc.sampling_rate == 16000
    assert len(wave) == len(ids) * 16000 // 50  # two 10 ms mel frames per 20 ms unit, exactly


def test_save_and_load_give_identical_audio_and_keep_the_tokenizer(griffin_lim, units, tmp_path):
    voc, _ = griffin_lim
    voc.save_pretrained(tmp_path / "voc")
    back = load_vocoder(tmp_path / "voc")
    assert isinstance(back, GriffinLimVocoder)
    ids = units.encode(fsdd_clip("2_lucas_4.wav"), dedup=False)
    assert np.array_equal(back.decode(ids), voc.decode(ids))
    assert np.array_equal(back.unit_tokenizer().centroids, units.centroids)  # units/ saved with it
    config = json.loads((tmp_path / "voc" / "vocoder_config.json").read_text())
    assert config["kind"] == "griffin-lim" and config["adapter"]["vocab_size"] == K


def test_bad_units_raise_a_named_error(griffin_lim):
    voc, _ = griffin_lim
    for bad, what in (([0, 1, K], f"\\[0, {K}\\)"), ([-1, 2], "outside"), ([], "non-empty"), ([[1, 2]], "1-D"),
                      ([0.5, 1.0], "integer")):
        with pytest.raises(UnitsOutOfRange, match=what):
            voc.decode(bad)


def test_deduplicated_units_last_their_mean_duration(griffin_lim):
    durations = mean_durations([[3, 3, 3, 1, 3], [1, 1]], vocab_size=4)
    # unit 3: runs of 3 and 1 -> 2; unit 1: runs of 1 and 2 -> 1.5; 0 and 2 unseen -> the mean run, 7 / 4
    assert np.allclose(durations, [1.75, 1.5, 1.75, 2.0])
    assert expand_durations([3, 1, 0], durations).tolist() == [3, 3, 1, 1, 0, 0]
    voc, _ = griffin_lim
    dedup = [0, 5, 2, 7]
    frames = expand_durations(dedup, voc.durations)
    assert len(voc.decode(dedup, deduplicated=True)) == len(frames) * 320 > len(dedup) * 320


def test_a_folder_that_is_no_vocoder_is_named(tmp_path):
    with pytest.raises(VocoderError, match="not a vocoder folder"):
        load_vocoder(tmp_path)
    (tmp_path / "vocoder_config.json").write_text('{"kind": "wavenet"}')
    with pytest.raises(VocoderError, match="unknown kind 'wavenet'.*griffin-lim"):
        load_vocoder(tmp_path)


# -- the CLI ----------------------------------------------------------------------------------------
def test_vocoder_fit_and_resynth_from_the_cli(fsdd, units_dir, tmp_path):
    write_manifest([Utterance(audio=str(FSDD_REC / n)) for n in CLIPS], tmp_path / "m.jsonl")
    r = run_cli("vocoder", "fit", "--kind", "griffin-lim", "--units", units_dir, "--data", tmp_path / "m.jsonl",
                "--out", tmp_path / "voc", "--steps", 20, "--channels", 16, "--batch-size", 4)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote" in r.stdout and "L1 loss" in r.stdout and "8 clips" in r.stdout
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00")
    clips = [FSDD_REC / "3_nicolas_0.wav", FSDD_REC / "8_yweweler_1.wav"]  # speakers it was not fitted on
    r = run_cli("resynth", *clips, tmp_path / "broken.wav", "--vocoder", tmp_path / "voc", "--out", tmp_path / "out")
    assert r.returncode == 1, r.stderr[-2000:]  # one reject; the others were still written
    assert "broken.wav" in r.stderr and "Traceback" not in r.stderr
    for c in clips:
        audio, rate = sf.read(tmp_path / "out" / f"{c.stem}.wav", dtype="float32")
        assert rate == 16000 and audio.ndim == 1 and len(audio) > 1600 and np.abs(audio).max() > 0
        assert sf.info(tmp_path / "out" / f"{c.stem}.wav").subtype == "PCM_16"
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [x["file"] for x in rejects] == [str(tmp_path / "broken.wav")] and "broken.wav" in rejects[0]["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([f"{c.stem}.wav" for c in clips] + ["rejects.jsonl"])


# -- a units LM that speaks through an attached vocoder -----------------------------------------------
# The LM is tiny and random (as in test_spoken_eval) and the vocoder the griffin-lim fit above: what
# is checked is the path (attach, load, `earful generate --out out.wav`, `earful.load().continue_speech`)
# and the refusal of a vocoder of other units (test_spoken_eval checks that without a vocoder
# `generate` refuses to write a WAV).
@pytest.fixture(scope="module")
def vocoder_dir(griffin_lim, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocoder")
    griffin_lim[0].save_pretrained(folder)  # (vocoder, fit report)
    return folder


@pytest.fixture(scope="module")
def units_lm(smol_dir, units, vocoder_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("units_lm")
    save_unit_lm(make_lm(smol_dir, K, units), folder)
    return folder


def test_an_attached_vocoder_makes_the_units_lm_speak(units_lm, vocoder_dir, tmp_path):
    r = run_cli("vocoder", "attach", "--model", units_lm, "--vocoder", vocoder_dir)
    assert r.returncode == 0 and (units_lm / VOCODER_DIR / "vocoder_config.json").is_file(), r.stderr[-2000:]
    out = tmp_path / "out.wav"
    r = run_cli("generate", "--model", units_lm, "--audio", FSDD_REC / CLIPS[0], "--out", out, "--max-new-tokens", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    wave, sr = sf.read(out, dtype="float32")
    prompt = fsdd_clip(CLIPS[0])
    assert sr == 16000 and np.isfinite(wave).all() and np.abs(wave).max() > 1e-3
    assert len(wave) > 0.5 * len(prompt)  # the prompt's units (deduplicated, mean durations) and 20 more

    import earful

    with earful.load(units_lm) as lm:
        assert lm.can_speak
        prompt_units, new, audio = lm.continue_speech(FSDD_REC / CLIPS[1], max_new_tokens=10, seed=0)
        assert len(new) > 0 and audio is not None and audio.dtype == np.float32 and len(audio) > 0


def test_a_vocoder_of_other_units_is_refused(units_lm, vocoder_dir, fsdd, tmp_path):
    feats = LayerFeatures("bundled:whisper-tiny.en")
    other = UnitTokenizer(fit_kmeans(np.concatenate(feats([fsdd_clip(n) for n in CLIPS[:4]])), K, seed=1), features=feats)
    lm_dir = tmp_path / "other_lm"
    save_unit_lm(_lm_like(units_lm, other), lm_dir)
    with pytest.raises(VocoderError, match="fitted on other units"):
        attach_vocoder(lm_dir, vocoder_dir)
    assert not (lm_dir / VOCODER_DIR).exists()
    assert load_speaking_unit_lm(lm_dir).audio_tokenizer.can_decode is False


def _lm_like(folder, tokenizer):
    from dataclasses import replace

    from earful.tokenizers.unit_lm import load_unit_lm

    return replace(load_unit_lm(folder), audio_tokenizer=tokenizer)
