"""The trainer's parts for the units family (`model.kind: units`): sound tokens in a causal LM.

`train()` (trainer.py) runs the same loop for both model families; for `model.kind: units` it
takes its model, batches, loss and saving from `units_parts` here. Audio is tokenised once, before the first
step (the audio tokenizer is frozen: never pay twice for it), and each utterance becomes one
token sequence in the recipe's `data.format` (earful.data.sequences).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..audio import load_audio
from ..data.dataset import usable_utterances
from ..data.manifest import Utterance, read_manifest
from ..data.sequences import IGNORE, TokenSequence, aligned, asr, interleaved, speech, tts, words_of
from ..models.processing import pad_ids
from ..models.vocab import UnitLM, build_unit_lm, save_unit_lm
from ..tokenizers import load_audio_tokenizer
from ..tokenizers.unit_lm import load_unit_lm
from .family import Family, Parts, check_trainable, token_weights, warn_upcast
from .preference import check_pairs, preference_batch, reference_logprobs
from .recipe import Recipe
from .recipe import RecipeError

logger = logging.getLogger(__name__)


def tokenize_audio(audio_tokenizer, utterances: list[Utterance], frames: bool = False, batch_size: int = 16,
                   max_seconds: float | None = 30.0, desc: str = "tokenising audio") -> list[list[int]]:
    """Each utterance's token ids, in order. `frames`: one unit per frame (no dedup), for aligned formats."""
    kwargs = {"dedup": False} if frames and audio_tokenizer.kind == "units" else {}
    order = sorted(range(len(utterances)), key=lambda i: utterances[i].duration or 0.0)
    out: list[list[int] | None] = [None] * len(utterances)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[s : s + batch_size]
        waves = [load_audio(utterances[i].audio, audio_tokenizer.sampling_rate, max_seconds=max_seconds) for i in idx]
        for i, ids in zip(idx, audio_tokenizer.encode_batch(waves, **kwargs)):
            out[i] = ids
    return out


def build_sequences(lm: UnitLM, utterances: list[Utterance], units: list[list[int]], fmt: str,
                    text_delay: float = 0.0, max_span_words: int = 3, seed: int = 0) -> list[TokenSequence]:
    """One token sequence per utterance in format `fmt`."""
    vocab, tok, at = lm.vocab, lm.tokenizer, lm.audio_tokenizer
    rng = random.Random(seed)  # interleaving draws its spans once, reproducibly
    dedup = at.kind == "units" and at.dedup
    seqs = []
    for u, ids in zip(utterances, units):
        if fmt == "speech":
            seqs.append(speech(vocab, ids))
        elif fmt == "asr":
            seqs.append(asr(vocab, tok, ids, u.text))
        elif fmt == "tts":
            seqs.append(tts(vocab, tok, u.text, ids))
        else:
            words = words_of(u.words, u.text, u.duration, u.audio)
            if fmt == "interleaved":
                seqs.append(interleaved(vocab, tok, ids, at.frame_rate, words, rng, max_span_words, dedup, at.tokens_per_frame))
            else:
                seqs.append(aligned(vocab, tok, ids, at.frame_rate, words, text_delay, dedup, at.tokens_per_frame))
    return seqs


def pad_batch(seqs: list[TokenSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `labels` (B, L)."""
    input_ids, attention_mask = pad_ids([s.input_ids for s in seqs], pad_id)
    labels, _ = pad_ids([s.labels for s in seqs], IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def labelled_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal LM's logits where a label is: (n_labelled, V), their targets and rows (n_labelled,).

    The output layer runs only there (as the listening LM's `labelled_logits` does): a units LM's
    vocabulary is the text one plus the units, and most ASR/TTS positions carry no label.
    Soft-capping LLMs take the ordinary forward.
    """
    targets = labels[:, 1:]  # (B, L-1)
    keep = targets != IGNORE
    if getattr(model.config, "final_logit_softcapping", None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep]
    else:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return logits, targets[keep], keep.nonzero()[:, 0]


def units_family(model, weights=None) -> Family:
    """A causal LM's losses: logits at labelled positions only, weighted per token type by `weights`."""
    return Family(logits_at_labels=lambda m, batch, _: labelled_logits(m, **batch),
                  softcapped=bool(getattr(model.config, "final_logit_softcapping", None)), token_weights=weights)


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, token_weights=None) -> torch.Tensor:
    """Mean next-token loss over the labelled positions (`labelled_logits`): the value of
    `model(..., labels=labels).loss`, cheaper. Soft-capping LLMs take that `.loss` itself."""
    return units_family(model, token_weights).loss(model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})


class UnitsBatcher:
    """Token sequences of a manifest, tokenised once; indices -> padded batches on `device`."""

    def __init__(self, lm: UnitLM, recipe: Recipe, manifest: str, device: torch.device, desc: str):
        d = recipe.data
        self.utterances, self.rejects = usable_utterances(read_manifest(manifest), lm.audio_tokenizer.sampling_rate, d.max_seconds, manifest)
        start = time.perf_counter()
        units = tokenize_audio(lm.audio_tokenizer, self.utterances, frames=d.format in ("interleaved", "aligned"),
                               batch_size=recipe.train.batch_size, max_seconds=d.max_seconds, desc=desc)
        self.sequences = build_sequences(lm, self.utterances, units, d.format, d.text_delay, d.max_span_words, recipe.train.seed)
        logger.info("%s: %d utterances -> %d tokens in %.1f s", desc, len(units), sum(map(len, self.sequences)), time.perf_counter() - start)
        tok = lm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.device = device
        self.cache = None  # nothing of the model is cached: the audio is already tokens

    def lengths(self) -> list[float]:
        return [float(len(s)) for s in self.sequences]

    def durations(self) -> list[float]:
        return [u.duration or 0.0 for u in self.utterances]

    def __call__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in pad_batch([self.sequences[i] for i in idx], self.pad_id).items()}


class UnitsPreferenceBatcher:
    """DPO batches for a units LM: each prompt clip with its chosen and its rejected answer.

    A manifest row's `audio` is the prompt; `chosen` / `rejected` are each an audio file (a spoken
    answer, relative to the manifest like `audio`) or text. The prompt is laid out in the recipe's
    `data.format` (speech, asr or interleaved: `earful.data.sequences.preference`). The reference
    is the model as it starts; its log-probabilities of every pair are computed once.
    """

    def __init__(self, lm: UnitLM, recipe: Recipe, manifest: str, device: torch.device, desc: str, family: Family):
        from ..data.manifest import absolute_audio
        from ..data.sequences import preference, preference_prompt

        d, at = recipe.data, lm.audio_tokenizer
        self.utterances, self.rejects = usable_utterances(read_manifest(manifest), at.sampling_rate, d.max_seconds, manifest)
        check_pairs(self.utterances)
        prompts = tokenize_audio(at, self.utterances, frames=d.format == "interleaved", batch_size=recipe.train.batch_size,
                                 max_seconds=d.max_seconds, desc=desc + ": prompts")

        def spoken(answer: str) -> str | None:
            path = Path(absolute_audio(Path(manifest), answer))
            return str(path) if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file() else None

        files = sorted({f for u in self.utterances for f in (spoken(u.chosen), spoken(u.rejected)) if f})
        answer_units = dict(zip(files, tokenize_audio(at, [Utterance(audio=f, text="") for f in files], batch_size=recipe.train.batch_size,
                                                       max_seconds=d.max_seconds, desc=desc + ": spoken answers"))) if files else {}
        rng = random.Random(recipe.train.seed)
        dedup = at.kind == "units" and at.dedup
        self.pairs = []
        for u, units in zip(self.utterances, prompts):
            words = words_of(u.words, u.text, u.duration, u.audio) if d.format == "interleaved" else None
            prompt = preference_prompt(lm.vocab, lm.tokenizer, units, d.format, at.frame_rate, words, rng, d.max_span_words,
                                       dedup, at.tokens_per_frame)
            self.pairs.append(tuple(
                preference(lm.vocab, lm.tokenizer, prompt, d.format, answer_units=answer_units[f]) if (f := spoken(a))
                else preference(lm.vocab, lm.tokenizer, prompt, d.format, answer_text=a) for a in (u.chosen, u.rejected)))
        tok = lm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.device = device
        self.cache = None
        self.reference = reference_logprobs(family, lm.model, self._pair, self.lengths(), recipe.train.batch_size, desc + ": reference log-probs (once)")
        logger.info("%s: %d preference pairs (%d spoken answers)", desc, len(self.pairs), len(files))

    def lengths(self) -> list[float]:
        return [float(len(c) + len(r)) for c, r in self.pairs]

    def durations(self) -> list[float]:
        return [u.duration or 0.0 for u in self.utterances]

    def _batch(self, idx: list[int], k: int) -> dict[str, torch.Tensor]:
        return {n: v.to(self.device) for n, v in pad_batch([self.pairs[i][k] for i in idx], self.pad_id).items()}

    def _pair(self, idx: list[int]) -> tuple[dict, dict]:
        return self._batch(idx, 0), self._batch(idx, 1)

    def __call__(self, idx: list[int]) -> dict:
        return preference_batch(self._pair(idx), self.reference, idx)


AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


def build_units_lm(recipe: Recipe) -> UnitLM:
    m = recipe.model
    if m.init_from:
        lm = load_unit_lm(m.init_from)
        if lm.audio_tokenizer is None:
            raise RecipeError(f"{m.init_from}: a units LM without an audio tokenizer (audio_tokenizer/) cannot be trained on audio")
        return lm
    warn_upcast("llm", m.llm)
    audio_tokenizer = load_audio_tokenizer(m.audio_tokenizer)
    model, tokenizer, vocab = build_unit_lm(m.llm, audio_tokenizer.vocab_size)
    return UnitLM(model, tokenizer, vocab, audio_tokenizer)


def save_units(lm: UnitLM, out_dir: Path) -> None:
    save_unit_lm(lm, out_dir)


def units_parts(recipe: Recipe, device: torch.device) -> Parts:
    """Sound tokens in a causal LM; the audio is tokenised once, before the first step."""
    lm = build_units_lm(recipe)
    lm.model.to(device).train()
    check_trainable(lm.model)
    v = lm.vocab
    specials = {v.sound_start_id, v.sound_end_id, v.text_start_id, v.text_end_id, lm.tokenizer.eos_token_id}
    per_frame = lm.audio_tokenizer.tokens_per_frame if lm.audio_tokenizer is not None else 1
    family = units_family(lm.model, token_weights(recipe.train.loss_weights, specials, first_unit_id=v.first_unit_id,
                                                  n_units=v.n_units, tokens_per_frame=per_frame))
    batcher = partial(UnitsPreferenceBatcher, family=family) if recipe.train.objective == "dpo" else UnitsBatcher
    train_batches = batcher(lm, recipe, recipe.data.train, device, "tokenising train audio (once)")
    eval_batches = batcher(lm, recipe, recipe.data.eval, device, "tokenising eval audio (once)") if recipe.data.eval else None
    return Parts(lm.model, family, train_batches, eval_batches, train_batches.durations(), len(train_batches.utterances),
                 save=lambda m, out: save_units(replace(lm, model=m), out), rebuild=lambda: build_units_lm(recipe).model,
                 text_model=lambda m: (m, lm.tokenizer),  # text-only scores of the LLM whose vocabulary grew
                 rejects=train_batches.rejects + (eval_batches.rejects if eval_batches else []))
