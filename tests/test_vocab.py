"""Sound tokens in an LLM: added to the real SmolLM2 tokenizer, embeddings grown at the old mean,
saved as one folder that plain AutoModelForCausalLM + AutoTokenizer load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from conftest import tiny_configs
from earful.models.vocab import (
    MARKERS, SoundVocab, SoundVocabError, UnitLM, add_sound_tokens, extend_lm, save_unit_lm, sound_token,
)
from earful.tokenizers.unit_lm import load_unit_lm
from earful.tokenizers.units import UnitTokenizer

N_UNITS = 24


@pytest.fixture
def tiny(smol_dir):
    tok = AutoTokenizer.from_pretrained(smol_dir)
    _, cfg = tiny_configs(len(tok))
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


def test_sound_tokens_are_one_contiguous_range_after_the_text_vocabulary(tiny):
    _, tok = tiny
    n_text = len(tok)
    vocab = add_sound_tokens(tok, N_UNITS)
    assert vocab.first_unit_id == n_text and vocab.n_units == N_UNITS
    assert tok.convert_tokens_to_ids(sound_token(N_UNITS - 1)) == n_text + N_UNITS - 1
    assert [vocab.sound_start_id, vocab.sound_end_id, vocab.text_start_id, vocab.text_end_id] == \
        tok.convert_tokens_to_ids(list(MARKERS)) == list(range(n_text + N_UNITS, n_text + N_UNITS + 4))
    # Each sound token is one token, never split, and decoding without special tokens drops them.
    ids = tok("<|sound_start|><|sound_0003|><|sound_0017|><|sound_end|> seven", add_special_tokens=False)["input_ids"]
    assert ids[:4] == [vocab.sound_start_id, *vocab.token_ids([3, 17]), vocab.sound_end_id]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "seven"
    assert vocab.units(ids) == [3, 17]
    assert add_sound_tokens(tok, N_UNITS) == vocab  # idempotent
    with pytest.raises(SoundVocabError, match="already held 24 sound tokens"):
        add_sound_tokens(tok, 30)
    with pytest.raises(SoundVocabError, match=r"\[0, 24\)"):
        vocab.token_ids([3, 24])


def test_new_embedding_rows_start_at_the_mean_and_old_rows_are_untouched(tiny):
    model, tok = tiny
    old = model.get_input_embeddings().weight.detach().clone()  # (V, D)
    add_sound_tokens(tok, N_UNITS)
    extend_lm(model, tok)
    new = model.get_input_embeddings().weight.detach()
    assert new.shape == (len(tok), old.shape[1]) and model.config.vocab_size == len(tok)
    torch.testing.assert_close(new[: len(old)], old, rtol=0, atol=0)
    mean = old.mean(0)
    assert torch.allclose(new[len(old):], mean.expand(len(tok) - len(old), -1), atol=1e-3)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)  # the tied output layer grew too


def test_save_then_plain_auto_classes_load_it(tiny, tmp_path):
    model, tok = tiny
    vocab = add_sound_tokens(tok, N_UNITS)
    extend_lm(model, tok)
    units = UnitTokenizer(np.random.default_rng(0).normal(size=(N_UNITS, 8)).astype(np.float32), "bundled:whisper-tiny.en", 4)
    save_unit_lm(UnitLM(model, tok, vocab, units), tmp_path / "lm")

    plain_model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "lm")
    assert len(plain_tok) == len(tok) and SoundVocab.from_tokenizer(plain_tok) == vocab
    ids = torch.tensor([[vocab.sound_start_id, *vocab.token_ids([1, 5, 9]), vocab.sound_end_id]])
    with torch.no_grad():
        torch.testing.assert_close(plain_model(ids).logits, model(ids).logits)

    lm = load_unit_lm(tmp_path / "lm")
    assert lm.vocab == vocab and lm.audio_tokenizer.vocab_size == N_UNITS
    np.testing.assert_array_equal(lm.audio_tokenizer.centroids, units.centroids)


def test_load_refuses_mismatched_parts(tiny, tmp_path):
    model, tok = tiny
    vocab = add_sound_tokens(tok, N_UNITS)
    extend_lm(model, tok)
    wrong = UnitTokenizer(np.zeros((N_UNITS + 1, 8), dtype=np.float32))
    save_unit_lm(UnitLM(model, tok, vocab, wrong), tmp_path / "lm")
    with pytest.raises(SoundVocabError, match="25 ids but the LM 24 sound tokens"):
        load_unit_lm(tmp_path / "lm")
    with pytest.raises(SoundVocabError, match="not a units LM folder"):
        load_unit_lm(tmp_path)


@pytest.mark.slow
def test_bundled_smollm2_keeps_its_text_predictions(smol_dir, tmp_path):
    from earful.models.vocab import build_unit_lm

    base = AutoModelForCausalLM.from_pretrained(smol_dir).eval()
    model, tok, vocab = build_unit_lm("bundled:smollm2-135m-instruct", 100)
    assert vocab.first_unit_id == 49152 and model.get_input_embeddings().num_embeddings == 49152 + 104
    save_unit_lm(UnitLM(model, tok, vocab), tmp_path / "lm")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before, after = base(ids).logits, reloaded(ids).logits
    torch.testing.assert_close(after[..., :49152], before, rtol=1e-4, atol=1e-4)
