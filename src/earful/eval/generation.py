"""Metrics of generated speech: GenPPL (is it fluent language?) and Auto-BLEU (is it looping?).

GenPPL (GSLM, Lakhotia et al. 2021): transcribe each generation with an ASR model, then score the
transcripts with a text LM; the perplexity over all their tokens. Lower is better, but a model
that repeats one phrase also scores low, hence Auto-BLEU beside it.

Auto-BLEU-n of one generation: the fraction of its word n-grams that also occur elsewhere in the
same generation; 0 for no repetition, 1 for a loop. Reported as the mean over generations.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch


def auto_bleu(words: list[str], n: int = 2) -> float | None:
    """Fraction of the n-grams of `words` that occur at another position too; None if it has none."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return None
    counts = Counter(grams)
    return sum(counts[g] > 1 for g in grams) / len(grams)


def corpus_auto_bleu(texts: list[str], n: int = 2) -> float | None:
    scores = [s for t in texts if (s := auto_bleu(t.split(), n)) is not None]
    return sum(scores) / len(scores) if scores else None


@torch.no_grad()
def transcribe_whisper(waves: list[np.ndarray], asr: str = "bundled:whisper-tiny.en", batch_size: int = 8) -> list[str]:
    """Transcripts of 16 kHz waveforms with a Whisper checkpoint (the ASR half of GenPPL)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from ..pretrained import resolve

    folder = resolve(asr)
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    texts = []
    for s in range(0, len(waves), batch_size):
        feats = processor(waves[s : s + batch_size], sampling_rate=16000, return_tensors="pt").input_features  # (B, 80, 3000)
        out = model.generate(feats, max_new_tokens=128)
        texts += [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    return texts


@torch.no_grad()
def text_nll(texts: list[str], lm: str = "bundled:smollm2-135m-instruct") -> list[tuple[float, int]]:
    """(summed negative log-likelihood in nats, tokens) of each text under a causal text LM.

    Every text is scored after one context token (the LM's BOS, else its EOS), so its first word counts too.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..pretrained import resolve

    folder = resolve(lm)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            out.append((0.0, 0))
            continue
        x = torch.tensor([[start, *ids]])
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)  # (n, V)
        out.append((-float(logp.gather(-1, x[0, 1:, None]).sum()), len(ids)))
    return out


def gen_ppl(texts: list[str], lm: str = "bundled:smollm2-135m-instruct") -> dict:
    """Corpus perplexity of transcripts under a text LM, and each transcript's own."""
    nll = text_nll(texts, lm)
    total, tokens = sum(n for n, _ in nll), sum(k for _, k in nll)
    return {
        "genppl": math.exp(total / tokens) if tokens else None,
        "tokens": tokens,
        "per_text": [math.exp(n / k) if k else None for n, k in nll],
    }
