"""What the training loop asks of a model family, and what a family hands it.

Two families train in the one loop of trainer.py: `listening` (encoder -> projector -> LLM,
train/listening.py) and `units` (sound tokens in a causal LM, train/units.py). Each builds a
`Family` (how its losses and log-probabilities are computed, with the recipe's token weights and,
for a frozen LLM, the prefix cache) and `Parts` (its model, batches and saving). The loop asks
neither the model's class nor its attributes which family it holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .losses import TokenWeights, weighted_cross_entropy
from .recipe import RecipeError

logger = logging.getLogger(__name__)


@dataclass
class Family:
    """How one model family computes its losses over a batch from its own batcher.

    `loss` is the mean next-token loss over the labelled positions (weighted per token type when
    `token_weights` is set); `labelled_logits` gives the logits at those positions, which DPO's
    sequence log-probabilities sum. Both run the output layer only where a label is.
    """

    # (model, batch, prefix_cache) -> logits (N, V), targets (N,), rows (N,) of the N labelled positions
    logits_at_labels: Callable[[nn.Module, dict, Any], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    softcapped: bool = False  # the LLM soft-caps its logits (Gemma): the loss is its own forward's, unweighted
    token_weights: TokenWeights | None = None  # train.loss_weights per token type; None: every labelled token counts 1
    prefix_cache: Any = None  # a frozen LLM's shared prompt prefix, run once (train/listening.py PrefixCache); the loss only
    kept_in_eval: list[nn.Module] = field(default_factory=list)  # parts that never train in dropout mode (a cached frozen encoder)

    def labelled_logits(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logits where a label is, their targets and rows, over the whole of every row."""
        return self.logits_at_labels(model, batch, None)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The batch's mean next-token loss: the value of `model(**batch).loss`, cheaper."""
        if self.softcapped:
            return model(**batch, return_dict=True).loss
        logits, targets, _ = self.logits_at_labels(model, batch, self.prefix_cache)
        return weighted_cross_entropy(logits, targets, self.token_weights)

    def train_mode(self, model: nn.Module) -> None:
        """Back to training mode after an evaluation, the parts in `kept_in_eval` excepted."""
        model.train()
        for part in self.kept_in_eval:
            part.eval()


@dataclass
class Parts:
    """What the training loop gets from a family's builder (`listening_parts`, `units_parts`)."""

    model: nn.Module
    family: Family
    train_batches: Callable  # indices -> a batch on the device; .lengths() groups batches by length
    eval_batches: Callable | None
    durations: list[float]  # audio seconds of each training example (for the audio_s_per_s log)
    n_utterances: int
    save: Callable[[nn.Module, Path], None]  # (model, out) writes the trained model as a save_pretrained folder
    rebuild: Callable[[], nn.Module]  # the same model, built afresh and whole (FSDP gathers the trained weights into it)
    text_model: Callable[[nn.Module], tuple] | None = None  # model -> (causal LM, tokenizer) for the text-ability gate
    samples: Callable[[int, Callable], list[dict]] | None = None  # (n, answer generator) -> eval clips with audio, reference, answer
    rejects: list[dict] = field(default_factory=list)  # manifest clips left out as unusable (data.dataset.usable_utterances)


def token_weights(weights: dict, special_ids: set, **sound) -> TokenWeights | None:
    """train.loss_weights as a `TokenWeights` over this family's special tokens; None when unset."""
    if not weights:
        return None
    found = TokenWeights(weights, {i for i in special_ids if i is not None}, **sound)
    logger.info("loss weights per token type: %s", found.w)
    return found


def check_trainable(model: nn.Module) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RecipeError("every part is frozen: unfreeze the projector, encoder or decoder in the recipe")
    logger.info("trainable parameters: %.2fM of %.1fM", sum(p.numel() for p in trainable) / 1e6,
                sum(p.numel() for p in model.parameters()) / 1e6)


def warn_upcast(key: str, spec: str) -> None:
    """Parts are trained in float32 (master weights; bf16 is autocast on CUDA): say so when the
    weights of model.`key` are stored in a lower precision."""
    from transformers import AutoConfig

    from ..pretrained import resolve

    stored = getattr(AutoConfig.from_pretrained(resolve(spec)), "dtype", None)
    if stored is not None and stored != torch.float32 and str(stored) not in ("float32", "torch.float32"):
        logger.warning("model.%s=%s: weights stored as %s -> loaded and trained as float32", key, spec, str(stored).removeprefix("torch."))
