"""Audio tokenizers: speech -> discrete token ids (and back, for codecs). See base.py.

Importing the package registers the built-in kinds (`units`, `codec`) with `load_audio_tokenizer`;
their heavy dependencies (faiss, a codec model) load only when a tokenizer is built or loaded.
"""

from . import codec, units  # noqa: F401  (register the built-in kinds)
from .base import KINDS, AudioTokenizer, AudioTokenizerError, DecodeUnsupported, deduplicate, load_audio_tokenizer

__all__ = ["KINDS", "AudioTokenizer", "AudioTokenizerError", "DecodeUnsupported", "deduplicate", "load_audio_tokenizer"]
