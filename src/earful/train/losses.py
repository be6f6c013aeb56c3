"""Loss weights per token type: how much each kind of target token counts in the next-token loss.

Types (`train.loss_weights` in a recipe, each 1.0 unless set):
- `text`: ordinary text tokens (a transcript, an answer, an interleaved word);
- `semantic`: sound tokens that carry content: every k-means unit, or a codec's first codebook;
- `acoustic`: a codec's other codebooks (detail the Mistral pipeline wanted to down-weight);
- `special`: end of turn / end of text, `<|sound_start|>`, `<|sound_end|>`, `<|text_start|>`, `<|text_end|>`.
Positions without a label (prompt, audio placeholders, padding) never count. The weighted loss is
sum(w * token loss) / sum(w) over labelled positions, so all weights 1 is the ordinary mean.
"""

from __future__ import annotations

import torch

TYPES = ("text", "semantic", "acoustic", "special")


class TokenWeights:
    """Maps target token ids (any shape) to their type's weight."""

    def __init__(self, weights: dict, special_ids: set[int], first_unit_id: int | None = None, n_units: int = 0,
                 tokens_per_frame: int = 1):
        unknown = set(weights) - set(TYPES)
        if unknown:
            raise ValueError(f"unknown token types {sorted(unknown)}: use {', '.join(TYPES)}")
        self.w = {t: float(weights.get(t, 1.0)) for t in TYPES}
        self.special = torch.tensor(sorted(special_ids), dtype=torch.long)
        self.first, self.n, self.per_codebook = first_unit_id, n_units, (n_units // tokens_per_frame if n_units else 0)

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        w = torch.full(targets.shape, self.w["text"], dtype=torch.float32, device=targets.device)
        if self.first is not None and self.n:
            unit = (targets >= self.first) & (targets < self.first + self.n)
            codebook0 = unit & (targets < self.first + self.per_codebook)
            w[unit] = self.w["acoustic"]
            w[codebook0] = self.w["semantic"]
        w[torch.isin(targets, self.special.to(targets.device))] = self.w["special"]
        return w


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: TokenWeights | None) -> torch.Tensor:
    """(N, V) logits and (N,) targets of labelled positions -> the (weighted) mean loss."""
    if weights is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets)
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    w = weights(targets)
    return (losses * w).sum() / w.sum().clamp(min=1e-8)


def batch_weight(batch: dict, weights: TokenWeights | None = None) -> float:
    """What a batch's mean loss is a mean over: its pairs (DPO), else the summed weights of its
    labelled target tokens (their count when unweighted), so that a batch split into parts has
    the whole's mean as the parts' means weighted by this."""
    if "chosen" in batch:
        return float(len(batch["ref_chosen"]))
    targets = batch["labels"][:, 1:]  # (B, L-1): position t predicts token t + 1
    targets = targets[targets != -100]
    return float(targets.numel()) if weights is None else float(weights(targets).sum())
