"""Speech recognition with a listening LM, and its WER / CER against a manifest's transcripts.

Both sides go through Whisper's English normaliser (transformers' `EnglishTextNormalizer`) before
scoring, so "7" and "seven", "Mr." and "mister", casing and punctuation all match, as in the
Whisper and Open ASR Leaderboard evaluations.

That normaliser folds spelled digits into one number ("four one seven" -> "417"), so a string of
digits counts as one word and a wrong digit in it as one error however long the string is. For
digit strings, `normalize_digit_words` (`normalizer="digits"`) spells every digit as its own word
instead: "417", "4-1-7" and "four one seven" are all "four one seven", three words.
"""

from __future__ import annotations

import logging
import re
import time
from functools import lru_cache
from pathlib import Path

import jiwer
import numpy as np
import torch
from tqdm.auto import tqdm

from .. import atomic
from ..audio import AudioError, audio_duration, load_audio
from ..data.dataset import length_grouped_batches
from ..data.manifest import Utterance
from ..errors import EarfulError
from ..models.processing import DEFAULT_PROMPT, check_audio_length, max_audio_seconds

logger = logging.getLogger(__name__)


class NothingToScore(EarfulError, ValueError):
    """No utterance of the manifest could be read and scored."""


def load_clip(path: str | Path, feature_extractor, encoder_config) -> np.ndarray:
    """A file as this encoder takes it: float32 mono at its rate, (T,), within its length limits.

    Raises an `AudioError`: unreadable, or too long / too short for the encoder (never cut to fit).
    """
    rate, limit = feature_extractor.sampling_rate, max_audio_seconds(feature_extractor, encoder_config)
    if limit is not None and (seconds := audio_duration(path)) > limit:  # refused from the header, never decoded
        check_audio_length(feature_extractor, encoder_config, round(seconds * rate), str(path))
    wave = load_audio(path, rate)  # the default max_seconds bounds what one decode may hold
    check_audio_length(feature_extractor, encoder_config, len(wave), str(path))
    return wave


@lru_cache(maxsize=1)
def _normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    # The British->American spelling table ships with Whisper checkpoints, not transformers;
    # without it the normaliser still folds numbers, case, punctuation and contractions.
    return EnglishTextNormalizer({})


def normalize(text: str) -> str:
    return _normalizer()(text).strip()


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NOT_WORD = re.compile(r"[^a-z0-9]+")


def normalize_digit_words(text: str) -> str:
    """Lower case, every digit 0-9 its own English word, apostrophes dropped, other punctuation a space.

    "417", "4-1-7", "4, 1, 7." and "Four one seven" all become "four one seven". Nothing else is
    rewritten: "oh" stays "oh" (not "zero"), "double one" stays two words, "twenty" stays
    "twenty", so an answer that says a digit some other way counts as the error it is against a
    reference that spells each digit.
    """
    text = text.lower().replace("'", "").replace("\u2019", "")
    text = re.sub(r"[0-9]", lambda m: f" {_DIGIT_WORDS[int(m.group())]} ", text)
    return " ".join(_NOT_WORD.sub(" ", text).split())


NORMALIZERS = {"whisper": normalize, "digits": normalize_digit_words}


def word_errors(references: list[str], hypotheses: list[str]) -> dict:
    """Corpus WER and its parts (jiwer's alignment) over already-normalised, non-empty references."""
    out = jiwer.process_words(references, hypotheses)
    words = out.hits + out.substitutions + out.deletions
    return {"wer": out.wer, "substitutions": out.substitutions, "deletions": out.deletions,
            "insertions": out.insertions, "reference_words": words}


@torch.no_grad()
def generate_text(model, processor, waves: list, prompts: list[str] | str = DEFAULT_PROMPT, max_new_tokens: int = 64, **generate_kwargs) -> list[str]:
    """Greedy (default), sampled or beam-searched answers for a batch of clips."""
    batch = processor(waves, prompts)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, **generate_kwargs)
    return processor.decode(out[:, batch["input_ids"].shape[1] :])


def evaluate_asr(
    model,
    processor,
    utterances: list[Utterance],
    *,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    normalizer: str = "whisper",
) -> dict:
    """Transcribe every utterance and score the corpus.

    `normalizer` (a key of `NORMALIZERS`) is applied to both sides before scoring: "whisper"
    (Whisper's English normaliser) or "digits" (each digit its own word, for digit strings).
    Audio that is unreadable, or too long or too short for the encoder, is recorded in `rejects`
    with the reason, not fatal.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {', '.join(NORMALIZERS)}, found {normalizer!r}")
    norm = NORMALIZERS[normalizer]
    start = time.perf_counter()
    waves, kept, rejects = [], [], []
    for u in utterances:
        try:
            waves.append(load_clip(u.audio, processor.feature_extractor, processor.config.encoder_config))
            kept.append(u)
        except AudioError as e:
            rejects.append({"id": u.id, "audio": u.audio, "error": type(e).__name__, "reason": e.reason})
            logger.warning("skipping %s", e)
    hyps: list[str] = [""] * len(kept)
    lengths = [len(w) for w in waves]
    model.eval()
    for idx in tqdm(length_grouped_batches(lengths, batch_size, 0, shuffle=False), desc="transcribing", unit="batch"):
        texts = generate_text(model, processor, [waves[i] for i in idx], prompt, max_new_tokens=max_new_tokens)
        for i, t in zip(idx, texts):
            hyps[i] = t
    rows, refs_n, hyps_n = [], [], []
    for u, h in zip(kept, hyps):
        r_n, h_n = norm(u.text), norm(h)
        rows.append({"id": u.id, "audio": u.audio, "reference": u.text, "hypothesis": h, "correct": r_n == h_n})
        if r_n:  # an empty reference has no WER; it is still listed
            refs_n.append(r_n)
            hyps_n.append(h_n)
    if not refs_n:
        why = f"; {len(rejects)} rejected, the first: {rejects[0]['audio']}: {rejects[0]['reason']}" if rejects else ""
        raise NothingToScore(f"no utterance with a non-empty transcript could be read: nothing to score{why}")
    report = {
        **word_errors(refs_n, hyps_n),
        "cer": jiwer.cer(refs_n, hyps_n),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "normalizer": normalizer,
        "n": len(rows),
        "rejected": len(rejects),
        "seconds": round(time.perf_counter() - start, 2),
        "utterances": rows,
        "rejects": rejects,
    }
    return report


def write_report(report: dict, path: str | Path) -> None:
    """JSON, written atomically: a crash never leaves half a report."""
    atomic.write_json(path, report)
