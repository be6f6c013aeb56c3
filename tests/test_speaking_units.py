"""A units LM on k-means units speaks once a vocoder fitted on its units is in its folder.

The LM is tiny and random (as in test_spoken_eval) and the vocoder the griffin-lim one that
test_vocoders fits on FSDD clips: what is checked is the path (attach, load, `earful generate
--out out.wav`, `earful.load().continue_speech`) and the refusal of a vocoder of other units
(test_spoken_eval checks that without a vocoder `generate` refuses to write a WAV).
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from conftest import FSDD_REC, fsdd_clip
from earful.models.vocab import save_unit_lm
from earful.tokenizers.units import LayerFeatures, UnitTokenizer, fit_kmeans
from earful.vocoders import VocoderError
from earful.vocoders.speaking import VOCODER_DIR, attach_vocoder, load_speaking_unit_lm

from test_data import run_cli
from test_spoken_eval import make_lm
from test_vocoders import CLIPS, K, griffin_lim, units, units_dir  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def vocoder_dir(griffin_lim, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("vocoder")
    griffin_lim[0].save_pretrained(folder)  # (vocoder, fit report)
    return folder


@pytest.fixture(scope="module")
def units_lm(smol_dir, units, vocoder_dir, tmp_path_factory):  # noqa: F811
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
