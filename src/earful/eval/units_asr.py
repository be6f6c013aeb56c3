"""Speech recognition with a units LM trained on the ASR format ([S> units <S] [T> text <T]).

Scored like the listening LM (earful.eval.asr): Whisper-normalised WER/CER and exact-match
accuracy, so the two families' figures sit side by side.
"""

from __future__ import annotations

import time

import jiwer
import torch
from tqdm.auto import tqdm

from ..data.manifest import Utterance
from ..data.sequences import asr_prompt
from ..models.processing import pad_ids
from .asr import normalize


@torch.no_grad()
def transcribe_units(lm, units: list[list[int]], max_new_tokens: int = 16, batch_size: int = 16) -> list[str]:
    """Greedy transcripts of unit sequences: generated after [S> units <S] [T>, up to <T]."""
    v, model = lm.vocab, lm.model
    model.eval()
    device = next(model.parameters()).device
    pad = v.sound_end_id  # any id: left padding is masked out
    texts: list[str] = [""] * len(units)
    order = sorted(range(len(units)), key=lambda i: len(units[i]))
    for s in tqdm(range(0, len(order), batch_size), desc="transcribing units", unit="batch", leave=False):
        idx = order[s : s + batch_size]
        rows = [asr_prompt(v, units[i]) for i in idx]
        ids, mask = pad_ids(rows, pad, side="left")  # every prompt ends where generation starts
        L = ids.shape[1]
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=v.text_end_id, pad_token_id=v.text_end_id,
                             suppress_tokens=list(v.unit_range) + [v.sound_start_id, v.sound_end_id, v.text_start_id])
        for j, i in enumerate(idx):
            new = out[j, L:].tolist()
            new = new[: new.index(v.text_end_id)] if v.text_end_id in new else new
            texts[i] = lm.tokenizer.decode(new, skip_special_tokens=True).strip()
    return texts


def evaluate_units_asr(lm, utterances: list[Utterance], units: list[list[int]], batch_size: int = 16) -> dict:
    """WER/CER/accuracy of `transcribe_units` against the utterances' transcripts."""
    start = time.perf_counter()
    hyps = transcribe_units(lm, units, batch_size=batch_size)
    rows = [{"id": u.id, "audio": u.audio, "reference": u.text, "hypothesis": h, "correct": normalize(u.text) == normalize(h)}
            for u, h in zip(utterances, hyps)]
    refs_n = [normalize(u.text) for u in utterances]
    keep = [i for i, r in enumerate(refs_n) if r]
    if not keep:
        raise ValueError("no utterance has a non-empty transcript: nothing to score")
    return {
        "wer": jiwer.wer([refs_n[i] for i in keep], [normalize(hyps[i]) for i in keep]),
        "cer": jiwer.cer([refs_n[i] for i in keep], [normalize(hyps[i]) for i in keep]),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "n": len(rows),
        "seconds": round(time.perf_counter() - start, 2),
        "utterances": rows,
    }
