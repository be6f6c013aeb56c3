"""Assemble a listening LM from pretrained parts, or load a trained one from its folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from ..pretrained import resolve
from .configuration import AUDIO_TOKEN, ModelInputError, SpeechLMConfig
from .encoders import load_encoder_weights
from .listening import SpeechLMForConditionalGeneration
from .processing import PromptFormat, SpeechLMProcessor

logger = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def add_audio_token(tokenizer) -> int:
    """Add `<|audio|>` as a special token (idempotent) and return its id."""
    tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name ("bfloat16", "float16", "float32", as a recipe writes it)."""
    if isinstance(dtype, torch.dtype):
        found = dtype
    else:
        found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if found not in DTYPES:
        raise ModelInputError(f"dtype must be one of {', '.join(str(d).removeprefix('torch.') for d in DTYPES)}, found {dtype!r}")
    return found


def _config(encoder_config, text_config, tokenizer, **fields) -> SpeechLMConfig:
    return SpeechLMConfig(encoder_config=encoder_config, text_config=text_config, audio_token_id=add_audio_token(tokenizer), **fields)


def assemble(
    encoder_config: PretrainedConfig,
    text_config: PretrainedConfig,
    tokenizer,
    feature_extractor,
    *,
    stack_factor: int = 4,
    projector_hidden_size: int = 1024,
    projector_dropout: float = 0.0,
    audio_norm: str | None = None,
    prompt_format: PromptFormat | None = None,
    encoder_spec: str | None = None,
    text_spec: str | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> tuple[SpeechLMForConditionalGeneration, SpeechLMProcessor]:
    """A listening LM with randomly initialised parts of the given architectures (tests use tiny ones)."""
    config = _config(encoder_config, text_config, tokenizer, stack_factor=stack_factor, projector_hidden_size=projector_hidden_size,
                     projector_dropout=projector_dropout, audio_norm=audio_norm, encoder_spec=encoder_spec, text_spec=text_spec)
    model = SpeechLMForConditionalGeneration(config).to(_dtype(dtype))
    _fit_vocabulary(model, tokenizer)
    return model, SpeechLMProcessor(tokenizer, feature_extractor, config, prompt_format)


def _fit_vocabulary(model: SpeechLMForConditionalGeneration, tokenizer) -> None:
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        # New rows start at the mean of the old ones (transformers' default): the placeholder's own
        # embedding is always overwritten by audio, but it must not be an outlier in the output layer.
        model.language_model.resize_token_embeddings(len(tokenizer))
    model.config.text_config = model.language_model.config
    # Never generate the placeholder.
    model.generation_config.suppress_tokens = [model.config.audio_token_id]
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_speech_lm(
    encoder: str,
    llm: str,
    *,
    stack_factor: int = 4,
    projector_hidden_size: int = 1024,
    projector_dropout: float = 0.0,
    audio_norm: str | None = None,
    prompt_format: PromptFormat | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> tuple[SpeechLMForConditionalGeneration, SpeechLMProcessor]:
    """A listening LM from two model specs (hub id, local folder or `bundled:NAME`).

    The encoder and the LLM carry their pretrained weights; the projector starts untrained. The
    architecture is made on the meta device (no memory), then each pretrained part is loaded
    straight into its place, so the LLM is allocated once, in `dtype` (float32 by default, the
    precision the trainer's optimiser keeps; bfloat16 or float16 halve the memory of a model
    that is frozen or trained under autocast).
    """
    start = time.perf_counter()
    dtype = _dtype(dtype)
    enc_dir, llm_dir = resolve(encoder), resolve(llm)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    config = _config(AutoConfig.from_pretrained(enc_dir), AutoConfig.from_pretrained(llm_dir), tokenizer, stack_factor=stack_factor,
                     projector_hidden_size=projector_hidden_size, projector_dropout=projector_dropout, audio_norm=audio_norm,
                     encoder_spec=encoder, text_spec=llm)
    with torch.device("meta"):
        model = SpeechLMForConditionalGeneration(config)
    model.language_model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype)
    load_encoder_weights(model.audio_tower, enc_dir, dtype=dtype)
    model.multi_modal_projector.to_empty(device="cpu")
    model._init_weights(model.multi_modal_projector)
    model.multi_modal_projector.to(dtype)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"left on the meta device: {leftover[:5]}"
    _fit_vocabulary(model, tokenizer)
    if getattr(model.language_model.generation_config, "eos_token_id", None) is not None:
        model.generation_config.eos_token_id = model.language_model.generation_config.eos_token_id
    logger.info("built listening LM from %s + %s (%s) in %.1f s", encoder, llm, dtype, time.perf_counter() - start)
    return model, SpeechLMProcessor(tokenizer, AutoFeatureExtractor.from_pretrained(enc_dir), config, prompt_format)


def load_speech_lm(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                   quantize: str | None = None) -> tuple[SpeechLMForConditionalGeneration, SpeechLMProcessor]:
    """A trained listening LM (in `dtype`, float32 by default) and its processor from a
    `save_pretrained` folder (or hub id); `quantize="int8"`: the LLM's linear layers in int8 for CPU
    inference (earful.models.quantize)."""
    from .quantize import quantize as quantized

    folder = resolve(str(folder))
    model = SpeechLMForConditionalGeneration.from_pretrained(folder, dtype=_dtype(dtype)).to(device).eval()
    return quantized(model, quantize), SpeechLMProcessor.from_pretrained(folder, config=model.config)


def save_speech_lm(model: SpeechLMForConditionalGeneration, processor: SpeechLMProcessor, folder: str | Path) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
