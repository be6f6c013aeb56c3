"""Speech recognition with a listening LM, and its WER / CER against a manifest's transcripts.

Both sides go through Whisper's English normaliser (transformers' `EnglishTextNormalizer`) before
scoring, so "7" and "seven", "Mr." and "mister", casing and punctuation all match, as in the
Whisper and Open ASR Leaderboard evaluations.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path

import jiwer
import torch
from tqdm.auto import tqdm

from .. import atomic
from ..audio import AudioError, load_audio
from ..data.dataset import length_grouped_batches
from ..data.manifest import Utterance
from ..models.processing import DEFAULT_PROMPT

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    # The British->American spelling table ships with Whisper checkpoints, not transformers;
    # without it the normaliser still folds numbers, case, punctuation and contractions.
    return EnglishTextNormalizer({})


def normalize(text: str) -> str:
    return _normalizer()(text).strip()


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
    max_seconds: float | None = 30.0,
) -> dict:
    """Transcribe every utterance and score the corpus. Unreadable audio is recorded, not fatal."""
    start = time.perf_counter()
    waves, kept, rejects = [], [], []
    for u in utterances:
        try:
            waves.append(load_audio(u.audio, processor.sampling_rate, max_seconds=max_seconds))
            kept.append(u)
        except AudioError as e:
            rejects.append({"audio": u.audio, "error": type(e).__name__, "reason": e.reason})
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
        r_n, h_n = normalize(u.text), normalize(h)
        rows.append({"id": u.id, "audio": u.audio, "reference": u.text, "hypothesis": h, "correct": r_n == h_n})
        if r_n:  # an empty reference has no WER; it is still listed
            refs_n.append(r_n)
            hyps_n.append(h_n)
    if not refs_n:
        raise ValueError("no utterance with a non-empty transcript could be read: nothing to score")
    report = {
        "wer": jiwer.wer(refs_n, hyps_n),
        "cer": jiwer.cer(refs_n, hyps_n),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
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
