"""Is the LLM still a good text LLM? The same text-only checks before and after speech training.

Two measures, on data shipped with earful (src/earful/eval/data/):
- held-out text likelihood: mean next-token negative log-likelihood (and perplexity) of plain
  English paragraphs, read as a user turn would be, without any audio;
- a 40-question multiple-choice set of everyday facts: each choice is scored by the summed
  log-likelihood of its tokens after the question (as lm-eval-harness scores MMLU-style tasks
  without letters), the highest wins; accuracy against 0.25 for chance.

`text_ability(model, tokenizer)` returns both; `regression(before, after)` compares two results,
so a training run can log the change and fail past a threshold (Ichigo's MMLU collapse is what
this guards against). Works on any causal LM, or on a listening LM's `language_model`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..models.processing import pad_ids


def _data(name: str) -> str:
    return (Path(__file__).parent / "data" / name).read_text(encoding="utf-8")


def multiple_choice_set() -> list[dict]:
    return [json.loads(line) for line in _data("multiple_choice.jsonl").splitlines() if line.strip()]


def heldout_text() -> list[str]:
    return [line for line in _data("heldout_text.txt").splitlines() if line.strip()]


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """(L,) ids -> (L-1,) log-probability of each token given those before it."""
    logits = model(input_ids=ids[None].to(model.device)).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[1:, None].to(model.device))[:, 0].cpu()


def text_nll(model, tokenizer) -> dict:
    total, n = 0.0, 0
    for line in heldout_text():
        ids = torch.tensor(tokenizer(line, add_special_tokens=True)["input_ids"])
        if tokenizer.bos_token_id is not None and ids[0] != tokenizer.bos_token_id:
            ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
        lp = _logprobs(model, ids)
        total -= float(lp.sum())
        n += len(lp)
    return {"text_nll": round(total / n, 4), "text_perplexity": round(math.exp(total / n), 3), "text_tokens": n}


@torch.no_grad()
def multiple_choice(model, tokenizer) -> dict:
    right = 0
    items = multiple_choice_set()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        n_ctx = len(tokenizer(context, add_special_tokens=True)["input_ids"])
        rows = [tokenizer(f"{context} {c}", add_special_tokens=True)["input_ids"] for c in item["choices"]]
        ids, mask = pad_ids(rows, pad)  # (choices, L), right-padded
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[:, :-1].float().cpu()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # (choices, L-1)
        keep = mask[:, 1:].clone()
        keep[:, : n_ctx - 1] = 0  # the choice's tokens only
        scores = (lp * keep).sum(-1)
        right += int(int(scores.argmax()) == item["answer"])
    return {"mc_accuracy": round(right / len(items), 4), "mc_questions": len(items), "mc_chance": 0.25}


def text_ability(model, tokenizer) -> dict:
    """Both measures for a causal LM (eval mode is set and restored)."""
    was_training = model.training
    model.eval()
    try:
        return {**text_nll(model, tokenizer), **multiple_choice(model, tokenizer)}
    finally:
        model.train(was_training)


def regression(before: dict, after: dict) -> dict:
    """How much worse `after` is: NLL increase (nats/token) and accuracy drop (points of 1)."""
    return {"text_nll_increase": round(after["text_nll"] - before["text_nll"], 4),
            "mc_accuracy_drop": round(before["mc_accuracy"] - after["mc_accuracy"], 4)}
