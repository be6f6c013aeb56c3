"""Fitting a big model on a small machine: LoRA adapters (peft) and layer dropping.

- `add_lora(model, part, ...)`: low-rank adapters on every linear layer of the LLM
  (`language_model`) or the audio encoder (`audio_tower`), through peft; only the adapters train,
  the base weights stay as they are. `merge_lora(model)` folds them back in before saving, so the
  saved folder is an ordinary model that loads without peft.
- `drop_layers(causal_lm, keep_every)`: keep every n-th decoder layer (the first always), as the
  Mistral pipeline shrinks its backbone; the config and each attention's layer index follow.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

PARTS = {"llm": "language_model", "encoder": "audio_tower"}


def add_lora(model: nn.Module, part: str, r: int = 8, alpha: int = 16, dropout: float = 0.05) -> int:
    """Wrap `model.<part>` with LoRA on all its linear layers; returns the adapters' parameter count."""
    from peft import LoraConfig, get_peft_model

    attr = PARTS[part]
    base = getattr(model, attr)
    # "all-linear" leaves out the output layer (lm_head), as peft's docs advise for causal LMs.
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", bias="none")
    wrapped = get_peft_model(base, config)
    setattr(model, attr, wrapped)
    n = sum(p.numel() for name, p in wrapped.named_parameters() if "lora_" in name)
    logger.info("LoRA on %s: r=%d alpha=%d, %.2fM adapter parameters", attr, r, alpha, n / 1e6)
    return n


def has_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return any(isinstance(getattr(model, attr, None), PeftModel) for attr in PARTS.values())


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA adapter into its base weights and drop the peft wrappers (in place)."""
    from peft import PeftModel

    for attr in PARTS.values():
        part = getattr(model, attr, None)
        if isinstance(part, PeftModel):
            setattr(model, attr, part.merge_and_unload())
            logger.info("merged LoRA into %s", attr)


def drop_layers(causal_lm: nn.Module, keep_every: int) -> list[int]:
    """Keep decoder layers 0, n, 2n, ... of a transformers causal LM (in place); returns their old indices."""
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    decoder = causal_lm.get_decoder()
    layers = decoder.layers
    kept = list(range(0, len(layers), keep_every))
    decoder.layers = nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    config = causal_lm.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)
    logger.info("kept %d of %d decoder layers: %s", len(kept), len(layers), kept)
    return kept
