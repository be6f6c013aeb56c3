"""The listening LM as transformers expects a model to behave (its ModelTesterMixin /
GenerationTesterMixin expectations, checked here on a tiny config-built model and real FSDD audio):
audio reaches the LLM whatever form the inputs take, generate() uses every audio input at prefill
only, tuples where `return_dict=False`, an exportable encoder, v5 feature outputs, the Trainer's
loss normalisation, declared capabilities that hold, and a saved folder that transformers' Auto
classes load into the same transcript as `earful transcribe`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer, StaticCache, Wav2Vec2FeatureExtractor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conftest import FSDD_REC, fsdd_clip, tiny_configs
from earful.models.build import assemble, save_speech_lm

CLIPS = ["7_jackson_0.wav", "3_george_1.wav", "0_lucas_2.wav"]


@pytest.fixture
def batch(fsdd, tiny_lm):
    _, processor = tiny_lm
    return processor([fsdd_clip(c) for c in CLIPS])  # left-padded, as for generation


def _tiny(smol_dir, encoder_config, text_config=None, feature_extractor=None, **kw):
    tok = AutoTokenizer.from_pretrained(smol_dir)
    _, txt = tiny_configs(len(tok))
    torch.manual_seed(0)
    return assemble(encoder_config, text_config or txt, tok, feature_extractor, stack_factor=4, projector_hidden_size=48, **kw)


def _waveform_config(config_cls, **extra):
    return config_cls(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=2, **extra)


# -- audio reaches the LLM whichever way the inputs come ------------------------------------------
def test_inputs_embeds_carry_the_audio(tiny_lm, batch):
    """transformers' `inputs_embeds` path: token embeddings computed by the caller, audio merged at
    the placeholders (found from input_ids, or from the placeholder's own embedding without them)."""
    model, _ = tiny_lm
    ids, mask = batch["input_ids"], batch["attention_mask"]
    audio = {"input_features": batch["input_features"], "input_features_mask": batch["input_features_mask"]}
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, **audio).logits
        no_audio = model(inputs_embeds=embeds, attention_mask=mask).logits
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, **audio).logits
        with_ids = model(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **audio).logits
    assert not torch.allclose(no_audio, expected, atol=1e-3)
    torch.testing.assert_close(from_embeds, expected)
    torch.testing.assert_close(with_ids, expected)

    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    greedy = model.generate(input_ids=ids, attention_mask=mask, **audio, **kw)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, **audio, **kw)  # new tokens only
    assert from_embeds.tolist() == greedy[:, ids.shape[1]:].tolist()

    # Embeddings whose placeholders were overwritten, and no input_ids: nowhere to put the audio.
    scrambled = embeds.clone()
    scrambled[ids == model.config.audio_token_id] = 0.0
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=scrambled, attention_mask=mask, **audio)


def test_generate_from_encoder_outputs(tiny_lm, batch):
    """`audio_hidden_states` (a cached frozen encoder's output) is used at prefill only, as
    `input_features` is: generate runs past its first step and answers the same."""
    model, _ = tiny_lm
    with torch.no_grad():
        hidden, hidden_mask = model.encode_audio(batch["input_features"], batch["input_features_mask"])
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    from_features = model.generate(input_features=batch["input_features"], input_features_mask=batch["input_features_mask"], **kw)
    from_hidden = model.generate(audio_hidden_states=hidden, audio_hidden_mask=hidden_mask, **kw)
    assert from_hidden.tolist() == from_features.tolist()
    # Without a cache every step reruns the whole sequence, so the audio must come every step.
    no_cache = model.generate(audio_hidden_states=hidden, audio_hidden_mask=hidden_mask, use_cache=False, **kw)
    assert no_cache.tolist() == from_features.tolist()


# -- outputs in transformers' forms ---------------------------------------------------------------
def test_return_dict_false_gives_tuples(fsdd, tiny_lm):
    model, processor = tiny_lm
    batch = processor([fsdd_clip(c) for c in CLIPS], responses=["seven", "three", "zero"])
    with torch.no_grad():
        out = model(**batch)
        loss, logits = model(**batch, return_dict=False)[:2]
        model.config.return_dict = False
        try:
            as_config = model(**batch)
            features = model.get_audio_features(batch["input_features"], batch["input_features_mask"])
        finally:
            model.config.return_dict = True
    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits)
    assert isinstance(as_config, tuple) and torch.equal(as_config[1], out.logits)
    assert isinstance(features, tuple)


def test_get_audio_features_is_a_v5_output(fsdd, tiny_lm):
    """`get_audio_features` returns `BaseModelOutputWithPooling`: the encoder's frames as
    `last_hidden_state` (B, T', C), the audio embeddings forward scatters as `pooler_output`
    (N, D), and the encoder's hidden states / attentions on request."""
    model, processor = tiny_lm
    feats = processor.featurize([fsdd_clip(c) for c in CLIPS])
    with torch.no_grad():
        out = model.get_audio_features(**feats, output_hidden_states=True)
        hidden, hidden_mask = model.encode_audio(**feats)
        embeds, mask = model.project_audio(hidden, hidden_mask)
    assert isinstance(out, BaseModelOutputWithPooling)
    enc = model.config.encoder_config
    assert out.last_hidden_state.shape == (3, hidden.shape[1], enc.d_model)
    torch.testing.assert_close(out.pooler_output, embeds[mask])
    assert out.pooler_output.shape == (int(mask.sum()), model.config.text_config.hidden_size)
    assert len(out.hidden_states) == enc.encoder_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    model.set_attn_implementation("eager")  # attention weights exist only where attention is computed by hand
    with torch.no_grad():
        att = model.get_audio_features(**feats, output_attentions=True).attentions
    assert len(att) == enc.encoder_layers and att[0].shape == (3, enc.encoder_attention_heads, hidden.shape[1], hidden.shape[1])


def test_loss_takes_shift_labels_and_num_items_in_batch(fsdd, tiny_lm):
    """As transformers' ForCausalLMLoss: with `num_items_in_batch` the loss is the sum over the
    micro-batch divided by that count, so gradient accumulation over micro-batches of different
    label counts gives the full batch's mean; `shift_labels` stand for labels shifted by one."""
    model, processor = tiny_lm
    waves, words = [fsdd_clip(c) for c in CLIPS], ["seven", "three hundred and twelve", "zero"]
    full = processor(waves, responses=words)
    parts = [processor(waves[:1], responses=words[:1]), processor(waves[1:], responses=words[1:])]
    n_items = int((full["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean = model(**full).loss
        accumulated = sum(model(**p, num_items_in_batch=torch.tensor(n_items)).loss for p in parts)
        labels = full["labels"]
        shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        shifted = model(**{**full, "labels": torch.full_like(labels, -100)}, shift_labels=shift).loss
    torch.testing.assert_close(accumulated, mean)
    torch.testing.assert_close(shifted, mean)


# -- declared capabilities hold -------------------------------------------------------------------
def test_base_model_prefix_names_the_llm(tiny_lm):
    model, _ = tiny_lm
    assert hasattr(model, model.base_model_prefix)
    assert model.base_model is model.language_model


def test_audio_encoder_exports(fsdd, tiny_lm):
    """torch.export traces the Whisper encoder (no branch on the mask's values): the exported
    program gives the eager outputs on a batch with padding and on one without."""
    model, processor = tiny_lm
    padded = processor.featurize([fsdd_clip(c) for c in CLIPS])
    exported = torch.export.export(model.audio_tower, (padded["input_features"], padded["input_features_mask"]))
    with torch.no_grad():
        eager_out, eager_mask = model.audio_tower(padded["input_features"], padded["input_features_mask"])
        out, mask = exported.module()(padded["input_features"], padded["input_features_mask"])
    torch.testing.assert_close(out.last_hidden_state, eager_out.last_hidden_state)
    assert torch.equal(mask, eager_mask) and not mask.all()
    # Same shapes, no padding at all: the mask the trace recorded is computed, not baked in.
    ones = torch.ones_like(padded["input_features_mask"])
    with torch.no_grad():
        eager_out, _ = model.audio_tower(padded["input_features"], ones)
        out, mask = exported.module()(padded["input_features"], ones)
    torch.testing.assert_close(out.last_hidden_state, eager_out.last_hidden_state)
    assert mask.all()


def test_static_cache_and_a_compiled_decode_step(tiny_lm, batch):
    """`_can_compile_fullgraph` is declared and true: greedy decoding with a static cache gives
    the dynamic cache's tokens, and both a prefill (encoder, audio merge, LLM) and a decode step
    compile as one graph each (no graph break) to the eager logits."""
    model, _ = tiny_lm
    assert model._can_compile_fullgraph
    kw = {**batch, "max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    dynamic = model.generate(**kw)
    static = model.generate(**kw, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()

    B, L = batch["input_ids"].shape
    steps = []
    with torch.no_grad():
        for _ in range(2):  # one cache for the compiled step, one for the eager one
            cache = StaticCache(config=model.config.text_config, max_cache_len=L + 4)
            token = model(**batch, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            steps.append({"input_ids": token, "past_key_values": cache, "use_cache": True,
                          "attention_mask": torch.cat([batch["attention_mask"], torch.ones(B, 1, dtype=torch.long)], 1),
                          "position_ids": batch["attention_mask"].sum(-1, keepdim=True)})
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
        got = compiled(**steps[0]).logits
        expected = model(**steps[1]).logits
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits)


def test_no_split_modules_and_attention_support_come_from_the_parts(smol_dir, whisper_dir):
    from transformers import AutoTokenizer, HubertConfig, Qwen2Config, WavLMConfig

    tok = AutoTokenizer.from_pretrained(smol_dir)
    enc, txt = tiny_configs(len(tok))
    whisper_llama, _ = _tiny(smol_dir, enc, txt, AutoFeatureExtractor.from_pretrained(whisper_dir))
    assert {"WhisperEncoderLayer", "LlamaDecoderLayer"} <= set(whisper_llama._no_split_modules)
    assert whisper_llama._supports_flash_attn and whisper_llama._supports_sdpa

    qwen = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tok))
    fe = Wav2Vec2FeatureExtractor(return_attention_mask=True)
    hubert_qwen, _ = _tiny(smol_dir, _waveform_config(HubertConfig, feat_extract_norm="layer", do_stable_layer_norm=True), qwen, fe)
    names = set(hubert_qwen._no_split_modules)
    assert {"HubertEncoderLayer", "Qwen2DecoderLayer"} <= names and not names & {"WhisperEncoderLayer", "LlamaDecoderLayer"}

    # WavLM computes attention by hand only: no flash attention, no SDPA, whatever the LLM offers.
    wavlm_llama, _ = _tiny(smol_dir, _waveform_config(WavLMConfig), txt, fe)
    assert not wavlm_llama._supports_flash_attn and not wavlm_llama._supports_sdpa
    with pytest.raises(ValueError, match="does not support Flash Attention"):
        wavlm_llama.set_attn_implementation("flash_attention_2")


def test_whisper_encoder_hands_flash_attention_a_padding_mask(fsdd, tiny_lm):
    """Flash attention takes padding as a 2D (B, T') mask, not an additive (B, 1, T', T') one.
    An attention function registered under a flash name (so transformers gives it flash's mask)
    computes exact attention from that 2D mask: a padded batch encodes as under SDPA, which shows
    the encoder hands every implementation the mask in that implementation's own form."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import flash_attention_mask

    seen = []

    def padded_flash(module, query, key, value, attention_mask, **kwargs):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        bias = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        out, _ = sdpa_attention_forward(module, query, key, value, bias, **kwargs)
        return out, None

    AttentionInterface.register("padding_probe", padded_flash)
    AttentionMaskInterface.register("padding_probe", flash_attention_mask)
    model, processor = tiny_lm
    feats = processor.featurize([fsdd_clip(c) for c in CLIPS])
    with torch.no_grad():
        expected, _ = model.audio_tower(feats["input_features"], feats["input_features_mask"])
        model.audio_tower.set_attn_implementation("padding_probe")
        got, _ = model.audio_tower(feats["input_features"], feats["input_features_mask"])
    B, T = feats["input_features_mask"].shape[0], expected.last_hidden_state.shape[1]
    assert seen and set(seen) == {(B, T)}
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, batch_invariant", [("wavlm", True), ("data2vec-audio", False)])
def test_each_claimed_waveform_encoder_works(fsdd, smol_dir, name, batch_invariant):
    """WavLM and data2vec-audio (claimed beside wav2vec2 / HuBERT, tested in test_models) train and
    count their frames as the processor does. data2vec-audio's stacked positional convolutions
    carry padding into a clip's last frames, so only the layer-norm encoders give a clip the same
    answer alone as in a batch."""
    from transformers import Data2VecAudioConfig, WavLMConfig

    from earful.models.encoders import encoder_output_lengths

    config = (_waveform_config(WavLMConfig, feat_extract_norm="layer", do_stable_layer_norm=True) if name == "wavlm"
              else _waveform_config(Data2VecAudioConfig))
    model, processor = _tiny(smol_dir, config, feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=True))
    model.eval()
    batch = processor([fsdd_clip(c) for c in CLIPS], responses=["seven", "three", "zero"])
    with torch.no_grad():
        out = model(**batch)
        _, mask = model.encode_audio(batch["input_features"], batch["input_features_mask"])
        alone = model(**processor([fsdd_clip(CLIPS[1])], responses=["three"])).logits[0]
    assert torch.isfinite(out.loss)
    assert mask.sum(-1).tolist() == encoder_output_lengths(model.config.encoder_config, batch["input_features_mask"].sum(-1)).tolist()
    if batch_invariant:
        torch.testing.assert_close(out.logits[1, : alone.shape[0]], alone, rtol=1e-4, atol=1e-4)
    generated = model.generate(**processor([fsdd_clip(CLIPS[0])]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] > 3


def test_unsupported_encoders_are_refused_by_name():
    from transformers import Wav2Vec2BertConfig

    from earful.models.encoders import build_audio_encoder

    # w2v-BERT reads (T, 160) filter-bank frames and has no conv front end: not a waveform encoder.
    with pytest.raises(ValueError, match="wav2vec2-bert"):
        build_audio_encoder(Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))


# -- building -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_loads_each_part_once_in_the_asked_dtype(whisper_dir, smol_dir, dtype):
    """build_speech_lm makes the architecture on the meta device and loads each pretrained part
    straight into it: every weight in `dtype`, the LLM's equal to its checkpoint's, and the bytes
    allocated by the whole build under 2.5x the LLM checkpoint (a random LLM built first, then
    replaced by the pretrained one, allocated 3.5x: 1,810 MiB for SmolLM2-135M's 513 MiB)."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from earful.models.build import build_speech_lm

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model, processor = build_speech_lm(whisper_dir, smol_dir, dtype=dtype)
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    checkpoint = sum(f.stat().st_size for f in Path(smol_dir).glob("*.safetensors"))
    assert allocated < 2.5 * checkpoint, (allocated / 2**20, checkpoint / 2**20)

    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    ref = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=dtype).state_dict()
    ours = model.language_model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(ours[name], ref[name]), name
    V = ref["model.embed_tokens.weight"].shape[0]
    assert torch.equal(ours["model.embed_tokens.weight"][:V], ref["model.embed_tokens.weight"])
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer)
    assert model.multi_modal_projector.linear_1.weight.std() > 0  # initialised, not left empty


# -- the processor and the Auto classes ------------------------------------------------------------
def test_processor_save_load_and_chat_template(fsdd, tiny_lm, tmp_path):
    """SpeechLMProcessor is a transformers ProcessorMixin: AutoProcessor reloads a saved folder
    with its prompt format, and apply_chat_template takes audio content parts as transformers'
    audio processors do, giving the ids earful's own prompt path gives."""
    from transformers import AutoProcessor, ProcessorMixin

    from earful.models.processing import SpeechLMProcessor

    model, processor = tiny_lm
    processor.prompt_format.system_prompt = "You transcribe speech."
    try:
        save_speech_lm(model, processor, tmp_path / "m")
    finally:
        processor.prompt_format.system_prompt = None
    loaded = AutoProcessor.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, SpeechLMProcessor) and isinstance(loaded, ProcessorMixin)
    assert loaded.prompt_format.system_prompt == "You transcribe speech."
    assert loaded.config.audio_token_id == model.config.audio_token_id and loaded.config.stack_factor == 2

    path = FSDD_REC / CLIPS[0]
    wave = fsdd_clip(CLIPS[0])
    expected = loaded([wave], "Transcribe the audio: <|audio|>")
    conv = [{"role": "user", "content": [{"type": "text", "text": "Transcribe the audio:"}, {"type": "audio", "path": str(path)}]}]
    got = loaded.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    for k in ("input_ids", "attention_mask", "input_features", "input_features_mask"):
        assert torch.equal(got[k], expected[k]), k
    text = loaded.apply_chat_template(conv, add_generation_prompt=True)
    assert text.count("<|audio|>") == 1 and "You transcribe speech." in text
    # transformers' two-step form: the laid-out text, then text + audio.
    assert torch.equal(loaded(text=text, audio=[wave])["input_ids"], expected["input_ids"])
    # Audio alone asks for what the model was trained on (its default prompt), as the server does.
    alone = loaded.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": wave}]}],
                                       add_generation_prompt=True, tokenize=True, return_dict=True)
    assert torch.equal(alone["input_ids"], expected["input_ids"])


def test_auto_classes_transcribe_as_the_cli_does(fsdd, tiny_lm, tmp_path):
    """A saved folder loaded with AutoProcessor + AutoModel gives, clip for clip, the transcript
    `earful transcribe --model DIR` prints."""
    from transformers import AutoModel, AutoProcessor

    from test_data import run_cli

    model, processor = tiny_lm
    # A random model answers with special tokens or one token over and over: forbid both in the
    # saved generation config, which both sides read, so each answer is 64 distinct tokens to compare.
    model.generation_config.suppress_tokens = sorted({*processor.tokenizer.all_special_ids, model.config.audio_token_id})
    model.generation_config.no_repeat_ngram_size = 1
    folder = tmp_path / "m"
    save_speech_lm(model, processor, folder)
    paths = [FSDD_REC / c for c in CLIPS]
    r = run_cli("transcribe", "--model", folder, *paths)
    assert r.returncode == 0, r.stderr
    cli = dict(line.split("\t", 1) for line in r.stdout.splitlines() if "\t" in line)
    assert len(cli) == 3 and all(len(t.split()) > 5 for t in cli.values()), r.stdout

    auto_processor = AutoProcessor.from_pretrained(folder)
    auto_model = AutoModel.from_pretrained(folder).eval()
    for p in paths:
        conv = [{"role": "user", "content": [{"type": "audio", "path": str(p)}]}]
        inputs = auto_processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
        out = auto_model.generate(**inputs, max_new_tokens=64, do_sample=False)
        text = auto_processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert cli[str(p)] == text, p
