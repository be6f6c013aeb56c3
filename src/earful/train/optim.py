"""The optimiser and its schedule: AdamW (or 8-bit AdamW), linear warm-up then cosine decay."""

from __future__ import annotations

import logging
import math
from functools import partial

import torch

from .recipe import RecipeError

logger = logging.getLogger(__name__)


def make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' AdamW8bit (block-wise 8-bit moments; CPU and CUDA)."""
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RecipeError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'earful[lowmem]'") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _warmup_cosine_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then a half cosine to 0 at `total`: transformers'
    get_cosine_schedule_with_warmup, step for step (a test holds them equal). Importing that one
    costs every training process ~2 s (transformers.optimization pulls in the Trainer's utilities,
    peft and bitsandbytes with it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_warmup_cosine_factor, warmup=warmup, total=total))


def warmup_steps(t) -> int:
    """train.warmup_steps, at most max_steps (a longer warm-up would never reach the peak lr)."""
    if t.warmup_steps > t.max_steps:
        logger.warning("train.warmup_steps: %d -> %d, because train.max_steps=%d", t.warmup_steps, t.max_steps, t.max_steps)
    return min(t.warmup_steps, t.max_steps)
