"""Audio tokenizers: speech -> discrete token ids (and back, for codecs). See base.py."""

from .base import AudioTokenizer, AudioTokenizerError, DecodeUnsupported, deduplicate, load_audio_tokenizer

__all__ = ["AudioTokenizer", "AudioTokenizerError", "DecodeUnsupported", "deduplicate", "load_audio_tokenizer"]
