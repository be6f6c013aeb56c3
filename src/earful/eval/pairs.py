"""Pairwise likelihood evaluation of a spoken LM: sBLIMP, sWUGGY, sStoryCloze, tStoryCloze style.

Each pair is two utterances, the correct one first. The model scores both by the log-likelihood
of their sound tokens, [S> u1 .. un: log p(u1 | [S>) + .. + log p(un | [S> u1 .. un-1)
(`score="sum"`), or that divided by n (`score="mean"`, which does not favour the shorter one).
A pair counts 1 if the correct utterance scores higher, 0.5 on a tie (within `TIE` nats),
0 otherwise; accuracy is reported overall and per group.

Pairs file (JSON Lines): `correct` and `wrong` (audio paths, relative to the file's folder or
absolute), optional `group` (e.g. "sStoryCloze") and `id`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.manifest import ManifestError, absolute_audio, json_lines
from ..models.processing import pad_ids

logger = logging.getLogger(__name__)

TIE = 1e-4  # nats: float32 noise between two scores of the same tokens is far smaller


@dataclass
class Pair:
    correct: str
    wrong: str
    group: str = "all"
    id: str | None = None


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a pairs file, paths made absolute. Errors name the line."""
    path = Path(path)
    pairs = []
    for n, row in json_lines(path, "pairs file"):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("correct", "wrong")):
            raise ManifestError(f"{path}:{n}: each line needs 'correct' and 'wrong' audio paths")
        pairs.append(Pair(absolute_audio(path, row["correct"]), absolute_audio(path, row["wrong"]), str(row.get("group", "all")), row.get("id")))
    if not pairs:
        raise ManifestError(f"{path}: holds no pairs")
    return pairs


@torch.no_grad()
def sound_loglik(lm, units: list[list[int]], batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed log-likelihood, number of tokens scored) of each unit sequence after [S>."""
    v, model = lm.vocab, lm.model
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int] | None] = [None] * len(units)
    order = sorted(range(len(units)), key=lambda i: len(units[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        rows = [[v.sound_start_id, *v.token_ids(units[i])] for i in idx]
        ids, mask = pad_ids(rows, v.sound_end_id)
        ids, mask = ids.to(device), mask.to(device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)  # (B, L-1, V)
        tok = logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]  # (B, L-1): log p of each next token
        for j, i in enumerate(idx):
            out[i] = (float(tok[j].sum()), len(rows[j]) - 1)
    return out


def pair_outcome(correct: float, wrong: float) -> float:
    if abs(correct - wrong) <= TIE:
        return 0.5
    return 1.0 if correct > wrong else 0.0


def score_pairs(lm, pairs: list[tuple[list[int], list[int]]], groups: list[str] | None = None,
                score: str = "sum", batch_size: int = 16, ids: list | None = None) -> dict:
    """Accuracy (1 / 0.5 / 0 per pair) over pairs of unit sequences, overall and per group."""
    if score not in ("sum", "mean"):
        raise ValueError(f"score must be 'sum' or 'mean', found {score!r}")
    flat = [u for pair in pairs for u in pair]
    ll = sound_loglik(lm, flat, batch_size)
    groups = groups or ["all"] * len(pairs)
    rows, by_group = [], defaultdict(list)
    for k, g in enumerate(groups):
        (c_sum, c_n), (w_sum, w_n) = ll[2 * k], ll[2 * k + 1]
        c, w = (c_sum, w_sum) if score == "sum" else (c_sum / max(c_n, 1), w_sum / max(w_n, 1))
        outcome = pair_outcome(c, w)
        by_group[g].append(outcome)
        rows.append({"id": ids[k] if ids else k, "group": g, "correct_score": c, "wrong_score": w,
                     "correct_tokens": c_n, "wrong_tokens": w_n, "outcome": outcome})
    outcomes = [r["outcome"] for r in rows]
    return {
        "accuracy": sum(outcomes) / len(outcomes),
        "n": len(outcomes),
        "ties": sum(o == 0.5 for o in outcomes),
        "score": score,
        "groups": {g: {"accuracy": sum(o) / len(o), "n": len(o)} for g, o in sorted(by_group.items())},
        "pairs": rows,
    }


def evaluate_pairs(lm, pairs: list[Pair], score: str = "sum", batch_size: int = 16) -> dict:
    """Tokenise every audio file once with the model's audio tokenizer, then `score_pairs`."""
    from ..audio import load_audio

    if lm.audio_tokenizer is None:
        raise ValueError("this units LM was saved without an audio tokenizer (audio_tokenizer/): it cannot read audio")
    start = time.perf_counter()
    files = sorted({p for pair in pairs for p in (pair.correct, pair.wrong)})
    at = lm.audio_tokenizer
    units = {}
    for s in tqdm(range(0, len(files), batch_size), desc="tokenising pairs", unit="batch", leave=False):
        chunk = files[s : s + batch_size]
        for f, u in zip(chunk, at.encode_batch([load_audio(f, at.sampling_rate) for f in chunk])):
            units[f] = u
    report = score_pairs(lm, [(units[p.correct], units[p.wrong]) for p in pairs], [p.group for p in pairs],
                         score, batch_size, [p.id or Path(p.correct).stem for p in pairs])
    for row, p in zip(report["pairs"], pairs):
        row.update(correct=p.correct, wrong=p.wrong)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report
