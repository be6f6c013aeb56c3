"""The training losses: loss weights per token type (train.loss_weights) on a units LM, each type
getting its weight and the weighted loss what a hand computation gives; DPO's sequence
log-probabilities; the listening family's loss path (labelled positions only, the prefix cache)."""

from __future__ import annotations

import pytest
import torch

from test_spoken_eval import make_lm

from earful.train.losses import TokenWeights, weighted_cross_entropy
from earful.train.units import causal_lm_loss


def test_each_token_type_gets_its_weight(smol_dir):
    lm = make_lm(smol_dir, n_units=12)  # a codec-like layout: 3 codebooks of 4
    v = lm.vocab
    w = TokenWeights({"text": 2.0, "semantic": 1.0, "acoustic": 0.25, "special": 0.0},
                     {v.sound_start_id, v.sound_end_id, v.text_start_id, v.text_end_id}, first_unit_id=v.first_unit_id,
                     n_units=12, tokens_per_frame=3)
    targets = torch.tensor([v.first_unit_id, v.first_unit_id + 3, v.first_unit_id + 4, v.first_unit_id + 11, v.sound_end_id, 300])
    assert w(targets).tolist() == [1.0, 1.0, 0.25, 0.25, 0.0, 2.0]
    with pytest.raises(ValueError, match="unknown token types"):
        TokenWeights({"noise": 1.0}, set())


def test_weighted_loss_matches_a_hand_computation(smol_dir):
    lm = make_lm(smol_dir, n_units=8)
    v = lm.vocab
    ids = torch.tensor([[v.sound_start_id, *v.token_ids([1, 2, 3]), v.sound_end_id, v.text_start_id, 300, 301, v.text_end_id]])
    labels = ids.clone()
    labels[0, 0] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    weights = TokenWeights({"text": 3.0, "semantic": 1.0, "special": 0.5}, {v.sound_start_id, v.sound_end_id, v.text_start_id, v.text_end_id},
                           first_unit_id=v.first_unit_id, n_units=8)
    with torch.no_grad():
        plain = causal_lm_loss(lm.model, **batch)
        weighted = causal_lm_loss(lm.model, **batch, token_weights=weights)
        logits = lm.model(input_ids=ids).logits[0, :-1]
        per_token = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    w = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 3.0, 3.0, 0.5])
    assert plain.item() == pytest.approx(per_token.mean().item(), rel=1e-5)
    assert weighted.item() == pytest.approx(((per_token * w).sum() / w.sum()).item(), rel=1e-5)
    assert weighted_cross_entropy(logits, ids[0, 1:], None).item() == pytest.approx(plain.item(), rel=1e-5)


def test_a_split_batch_weighted_by_batch_weight_gives_the_whole_loss(smol_dir):
    """What torchrun ranks rely on: the weighted loss of a batch is its parts' losses, each weighted
    by `batch_weight` (summed token weights, not token counts), over the parts' total weight."""
    from earful.train.losses import batch_weight
    from earful.train.units import pad_batch
    from earful.data.sequences import TokenSequence

    lm = make_lm(smol_dir, n_units=8)
    v = lm.vocab
    rows = [[v.sound_start_id, *v.token_ids([1, 2, 3, 4, 5]), v.sound_end_id],  # mostly units
            [v.text_start_id, 300, 301, 302, 303, v.text_end_id],  # mostly text
            [v.sound_start_id, *v.token_ids([6]), v.sound_end_id, v.text_start_id, 304, v.text_end_id]]
    seqs = [TokenSequence(r, [-100, *r[1:]]) for r in rows]
    weights = TokenWeights({"text": 3.0, "semantic": 1.0, "special": 0.25}, {v.sound_start_id, v.sound_end_id, v.text_start_id, v.text_end_id},
                           first_unit_id=v.first_unit_id, n_units=8)
    whole, parts = pad_batch(seqs, 0), [pad_batch(seqs[:1], 0), pad_batch(seqs[1:], 0)]
    with torch.no_grad():
        want = causal_lm_loss(lm.model, **whole, token_weights=weights).item()
        losses = [causal_lm_loss(lm.model, **b, token_weights=weights).item() for b in parts]
    w = [batch_weight(b, weights) for b in parts]
    assert w == [1.0 * 5 + 0.25, (3.0 * 4 + 0.25) + (1.0 + 0.25 * 3 + 3.0)]
    assert sum(loss * wi for loss, wi in zip(losses, w)) / sum(w) == pytest.approx(want, rel=1e-5)
    counts = [batch_weight(b) for b in parts]  # token counts: what a weighted run must not use
    assert counts == [6.0, 10.0] and sum(loss * c for loss, c in zip(losses, counts)) / sum(counts) != pytest.approx(want, rel=1e-3)


def test_sequence_logprobs_equal_the_full_softmax_sum():
    """DPO's per-row answer log-probability, computed only at labelled positions, equals summing
    log-softmax over the whole vocabulary at every position (padding and prompt excluded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from earful.train.preference import sequence_logprobs
    from earful.train.units import units_family

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids.clone()
    labels[:, :6] = -100
    labels[2, 9:] = -100
    with torch.no_grad():
        got = sequence_logprobs(units_family(m), m, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
    t = labels[:, 1:]
    want = (torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0] * (t != -100)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- the listening family's loss path (train/listening.py) -----------------------------------------
CLIPS = ["7_jackson_0.wav", "3_george_1.wav", "0_lucas_2.wav"]


def test_listening_loss_equals_the_forward_loss(fsdd, tiny_lm):
    """The training loss (output layer on labelled positions only) is the model's own forward loss."""
    from conftest import fsdd_clip
    from earful.train.listening import listening_family

    model, processor = tiny_lm
    batch = processor([fsdd_clip(c) for c in CLIPS], responses=["seven", "three", "zero"])
    with torch.no_grad():
        torch.testing.assert_close(listening_family(model).loss(model, batch), model(**batch).loss)


def test_prefix_cache_gives_the_same_loss_and_gradients(fsdd, tiny_lm):
    """A frozen LLM's shared prompt prefix, run once and reused as keys/values, changes nothing."""
    from conftest import fsdd_clip
    from earful.train.listening import PrefixCache, freeze, listening_family

    model, processor = tiny_lm
    processor.prompt_format.system_prompt = "You transcribe speech."
    freeze(model, encoder=True, decoder=True)
    waves = [fsdd_clip(n) for n in ("3_george_0.wav", "8_lucas_12.wav", "0_jackson_4.wav")]
    batch = processor(waves, "Transcribe the audio: <|audio|>", ["three", "eight", "zero"])
    cache = PrefixCache(model)
    P, _ = cache.split(batch["input_ids"], batch["attention_mask"])
    first_audio = int((batch["input_ids"][0] == model.config.audio_token_id).nonzero()[0])
    assert 10 < P <= first_audio  # the system prompt and the user turn's opening words
    plain, cached = listening_family(model), listening_family(model, prefix_cache=cache)
    losses, grads = [], []
    for family in (plain, cached, cached):  # the second use reads the stored keys/values
        model.zero_grad()
        loss = family.loss(model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(model.multi_modal_projector.linear_1.weight.grad.clone())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and losses[2] == losses[1]
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    # Rows with their own prompts share less: the prefix stops where they first differ.
    other = processor(waves[:2], ["Transcribe the audio: <|audio|>", "<|audio|> what was said?"], ["three", "eight"])
    ids = other["input_ids"]
    P2, _ = cache.split(ids, other["attention_mask"])
    assert P2 == int((ids[0] != ids[1]).nonzero()[0]) < P
    with torch.no_grad():
        assert cached.loss(model, other).item() == pytest.approx(plain.loss(model, other).item(), abs=1e-5)
    processor.prompt_format.system_prompt = None


def test_packed_rows_give_the_padded_loss_and_gradients(fsdd, tiny_lm):
    """train.packing: utterances sharing a row (positions restart, no mask) see only themselves, so
    the loss and the gradients are the padded batch's; there are fewer rows and fewer positions."""
    from conftest import fsdd_clip
    from earful.train.listening import listening_family, pack_rows

    model, processor = tiny_lm
    names = ["3_george_0.wav", "8_lucas_12.wav", "0_jackson_4.wav", "1_jackson_2.wav"]
    # Responses of very different lengths, so short rows can share a row with others.
    responses = ["three", "eight, and then a much longer answer that runs on for many more tokens than the others " * 4, "zero", "one"]
    batch = processor([fsdd_clip(n) for n in names], responses=responses)
    packed = pack_rows(batch)
    rows, L = batch["input_ids"].shape
    assert packed["input_ids"].shape[0] < rows and packed["input_ids"].shape[1] == L and "attention_mask" not in packed
    assert (packed["input_ids"] == model.config.audio_token_id).sum() == (batch["input_ids"] == model.config.audio_token_id).sum()
    assert (packed["labels"] != -100).sum() == (batch["labels"] != -100).sum()
    family = listening_family(model)
    losses, grads = [], []
    for b in (batch, packed):
        model.zero_grad()
        loss = family.loss(model, b)
        loss.backward()
        losses.append(loss.item())
        grads.append(model.multi_modal_projector.linear_1.weight.grad.clone())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    # Without the restart of positions (one long sequence a row), utterances would see each other: another loss.
    with torch.no_grad():
        leaky = {**packed, "position_ids": torch.arange(L)[None].expand_as(packed["position_ids"])}
        assert abs(family.loss(model, leaky).item() - losses[0]) > 1e-4  # measured 1.7e-4 on this tiny random LM; the packed loss is within 1e-5
