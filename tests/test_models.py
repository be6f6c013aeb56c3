"""The listening LM: encoder without 30 s padding, stacking, placeholders, generate, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, HubertConfig, Wav2Vec2Config, Wav2Vec2FeatureExtractor, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from conftest import fsdd_clip, tiny_configs
from earful.models import SpeechLMConfig, SpeechLMForConditionalGeneration
from earful.models.build import assemble, load_speech_lm, save_speech_lm
from earful.models.encoders import WhisperShortEncoder, encoder_output_lengths

CLIPS = ["7_jackson_0.wav", "3_george_1.wav", "0_lucas_2.wav"]


def test_short_encoder_matches_transformers_on_a_full_window():
    # Same weights, a full 30 s window: our encoder must be transformers' Whisper encoder exactly.
    cfg = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=80)
    torch.manual_seed(0)
    ref = WhisperEncoder(cfg).eval()
    ours = WhisperShortEncoder(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 80, 3000)
    expected = ref(x).last_hidden_state
    got, mask = ours(x)
    torch.testing.assert_close(got.last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    assert mask.all() and mask.shape == (2, 1500)


def test_short_encoder_accepts_short_input_and_refuses_over_30s():
    cfg = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)
    enc = WhisperShortEncoder(cfg).eval()
    out, mask = enc(torch.randn(1, 80, 101))
    assert out.last_hidden_state.shape == (1, 51, 32)  # ceil(101 / 2) frames
    with pytest.raises(ValueError, match="at most 3000 mel frames"):
        enc(torch.randn(1, 80, 3002))


def test_a_clip_encodes_the_same_alone_or_in_a_batch(fsdd, tiny_lm):
    model, processor = tiny_lm
    waves = [fsdd_clip(c) for c in CLIPS]
    batch = processor(waves, responses=["seven", "three", "zero"])
    with torch.no_grad():
        together = model(**batch).logits
        for i, w in enumerate(waves):
            alone = processor([w], responses=[["seven", "three", "zero"][i]])
            logits = model(**alone).logits[0]
            n = alone["input_ids"].shape[1]
            torch.testing.assert_close(together[i, :n], logits, rtol=1e-4, atol=1e-4)


def test_placeholders_labels_and_padding(fsdd, tiny_lm):
    model, processor = tiny_lm
    waves = [fsdd_clip(c) for c in CLIPS[:2]]
    batch = processor(waves, responses=["seven", "three"])
    audio_id = model.config.audio_token_id
    n_audio = processor.audio_positions(batch["input_features_mask"].sum(-1))
    # One placeholder per audio position, computed without running the encoder ...
    assert (batch["input_ids"] == audio_id).sum(-1).tolist() == n_audio.tolist()
    with torch.no_grad():
        hidden, mask = model.encode_audio(batch["input_features"], batch["input_features_mask"])
        _, stacked_mask = model.project_audio(hidden, mask)
    # ... and equal to what the encoder + stacker really produce.
    assert stacked_mask.sum(-1).tolist() == n_audio.tolist()
    # Loss only on the response and its end-of-turn token; never on the prompt or the audio.
    for i, word in enumerate(["seven", "three"]):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labelled == processor.response_ids(word)
        assert not (batch["labels"][i][batch["input_ids"][i] == audio_id] != -100).any()
    # Training batches pad on the right, generation batches on the left.
    assert batch["attention_mask"][:, 0].all()
    gen = processor(waves)
    assert gen["attention_mask"][:, -1].all() and "labels" not in gen


def test_placeholder_count_mismatch_is_a_clear_error(fsdd, tiny_lm):
    model, processor = tiny_lm
    batch = processor([fsdd_clip(CLIPS[0])])
    batch["input_ids"] = batch["input_ids"][:, 1:]  # drop one token ...
    batch["input_ids"][0, -1] = model.config.audio_token_id  # ... and add a stray placeholder
    batch["attention_mask"] = batch["attention_mask"][:, 1:]
    with pytest.raises(ValueError, match="placeholders but the audio gives"):
        model(**batch)


def test_generate_greedy_sampling_and_beam(fsdd, tiny_lm):
    model, processor = tiny_lm
    waves = [fsdd_clip(c) for c in CLIPS]
    batch = processor(waves)
    L = batch["input_ids"].shape[1]
    greedy = model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert greedy.shape == (3, L + 4)
    # Left padding is right: each clip decodes the same alone as in the batch.
    for i, w in enumerate(waves):
        alone = processor([w])
        out = model.generate(**alone, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        assert out[0, alone["input_ids"].shape[1]:].tolist() == greedy[i, L:].tolist()
    torch.manual_seed(0)
    sampled = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=20, min_new_tokens=4)
    beams = model.generate(**batch, max_new_tokens=4, num_beams=3, min_new_tokens=4)
    assert sampled.shape == beams.shape == (3, L + 4)
    assert model.config.audio_token_id not in greedy[:, L:].tolist()


def test_save_and_reload_give_the_same_logits(fsdd, tiny_lm, tmp_path):
    model, processor = tiny_lm
    batch = processor([fsdd_clip(c) for c in CLIPS], responses=["seven", "three", "zero"])
    with torch.no_grad():
        before = model(**batch).logits
    save_speech_lm(model, processor, tmp_path / "m")
    reloaded, processor2 = load_speech_lm(tmp_path / "m")
    with torch.no_grad():
        after = reloaded(**processor2([fsdd_clip(c) for c in CLIPS], responses=["seven", "three", "zero"])).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # The Auto classes know the architecture, and tied LLM embeddings stay tied.
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(auto, SpeechLMForConditionalGeneration)
    lm = reloaded.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    assert isinstance(SpeechLMConfig.from_pretrained(tmp_path / "m").encoder_config, WhisperConfig)


def test_freezing_and_gradient_checkpointing_train_only_the_projector(fsdd, tiny_lm):
    model, processor = tiny_lm
    model.audio_tower.requires_grad_(False)
    model.language_model.requires_grad_(False)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    batch = processor([fsdd_clip(c) for c in CLIPS], responses=["seven", "three", "zero"])
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("multi_modal_projector"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("config_cls", [Wav2Vec2Config, HubertConfig])
def test_waveform_encoders_through_automodel(fsdd, smol_dir, config_cls):
    from transformers import AutoTokenizer

    enc = config_cls(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True)
    tok = AutoTokenizer.from_pretrained(smol_dir)
    _, txt = tiny_configs(len(tok))
    model, processor = assemble(enc, txt, tok, Wav2Vec2FeatureExtractor(return_attention_mask=True), stack_factor=4, projector_hidden_size=48)
    model.eval()
    waves = [fsdd_clip(c) for c in CLIPS]
    batch = processor(waves, responses=["seven", "three", "zero"])
    with torch.no_grad():
        out = model(**batch)
        hidden, mask = model.encode_audio(batch["input_features"], batch["input_features_mask"])
    assert torch.isfinite(out.loss)
    lengths = encoder_output_lengths(enc, batch["input_features_mask"].sum(-1))
    assert mask.sum(-1).tolist() == lengths.tolist()
    assert hidden.shape[-1] == 32


def test_utterance_norm_takes_out_what_a_clip_adds_to_every_frame(fsdd, tiny_lm, tmp_path):
    """audio_norm="utterance": each clip's encoder frames get zero mean and unit variance per
    channel over its own frames (padding stays 0), so a constant offset or scale on a clip's frames
    (what a voice or a microphone adds) changes nothing; a clip is the same alone or in a batch,
    and the setting survives save/load."""
    from earful.models.listening import utterance_norm

    model, processor = tiny_lm
    hidden, mask = model.encode_audio(**processor.featurize([fsdd_clip(c) for c in CLIPS]))
    hidden = hidden.detach()
    normed = utterance_norm(hidden, mask)
    shifted = utterance_norm(hidden * 3.0 + torch.randn(1, 1, hidden.shape[-1]), mask)
    torch.testing.assert_close(shifted, normed, rtol=1e-3, atol=1e-3)
    n = int(mask[1].sum())
    torch.testing.assert_close(normed[1, :n], utterance_norm(hidden[1:2, :n], mask[1:2, :n])[0], rtol=1e-5, atol=1e-5)
    assert not normed[~mask].any()
    real = normed[0, : int(mask[0].sum())]
    torch.testing.assert_close(real.mean(0), torch.zeros(real.shape[1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(real.std(0, unbiased=False), torch.ones(real.shape[1]), rtol=1e-3, atol=1e-3)

    model.config.audio_norm = "utterance"
    try:
        batch = processor([fsdd_clip(c) for c in CLIPS], responses=["seven", "three", "zero"])
        with torch.no_grad():
            before = model(**batch).logits
        save_speech_lm(model, processor, tmp_path / "m")
    finally:
        model.config.audio_norm = None
    reloaded, _ = load_speech_lm(tmp_path / "m")
    assert reloaded.config.audio_norm == "utterance"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="audio_norm"):
        SpeechLMConfig(audio_norm="speaker")
