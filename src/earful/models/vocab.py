"""Sound tokens in any causal LM: early fusion of discrete speech units into a text vocabulary.

`add_sound_tokens` adds `<|sound_0000|>`..`<|sound_{K-1}|>` (one per audio-tokenizer id, in one
contiguous id range) and the modality markers `<|sound_start|>`, `<|sound_end|>`, `<|text_start|>`,
`<|text_end|>` to any transformers tokenizer; `extend_lm` grows the LM's input and output
embeddings to match, the new rows starting at the mean of the old ones (transformers'
`mean_resizing`: a new token starts as an "average" token, not an outlier that would dominate
the softmax). The result is saved as one `save_pretrained` folder that plain
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load, plus
`earful_sound_vocab.json` and the audio tokenizer in `audio_tokenizer/`, which earful uses to go
from audio to tokens and back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import EarfulError

logger = logging.getLogger(__name__)

SOUND_START, SOUND_END = "<|sound_start|>", "<|sound_end|>"
TEXT_START, TEXT_END = "<|text_start|>", "<|text_end|>"
MARKERS = (SOUND_START, SOUND_END, TEXT_START, TEXT_END)
VOCAB_FILE = "earful_sound_vocab.json"
AUDIO_TOKENIZER_DIR = "audio_tokenizer"
_SOUND = re.compile(r"^<\|sound_(\d{4,})\|>$")


class SoundVocabError(EarfulError, ValueError):
    """A tokenizer or token sequence that does not fit the sound vocabulary."""


def sound_token(i: int) -> str:
    return f"<|sound_{i:04d}|>"


@dataclass
class SoundVocab:
    """Where the sound tokens sit in an LM's vocabulary. Unit u is token id `first_unit_id + u`."""

    n_units: int
    first_unit_id: int
    sound_start_id: int
    sound_end_id: int
    text_start_id: int
    text_end_id: int

    def token_ids(self, units: list[int]) -> list[int]:
        """Audio-tokenizer ids -> LM token ids."""
        bad = [u for u in units if not 0 <= u < self.n_units]
        if bad:
            raise SoundVocabError(f"unit ids must lie in [0, {self.n_units}), found {bad[:5]}: "
                                  "the audio tokenizer does not match this model's sound vocabulary")
        return [self.first_unit_id + u for u in units]

    def units(self, token_ids: list[int]) -> list[int]:
        """LM token ids -> audio-tokenizer ids, keeping only sound tokens."""
        return [t - self.first_unit_id for t in token_ids if self.is_unit(t)]

    def is_unit(self, token_id: int) -> bool:
        return self.first_unit_id <= token_id < self.first_unit_id + self.n_units

    @property
    def unit_range(self) -> range:
        return range(self.first_unit_id, self.first_unit_id + self.n_units)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SoundVocab:
        """Find the sound tokens a tokenizer holds; they must be contiguous, as `add_sound_tokens` makes them."""
        vocab = tokenizer.get_vocab()
        units = sorted(int(m.group(1)) for tok in vocab if (m := _SOUND.match(tok)))
        if not units:
            raise SoundVocabError("the tokenizer holds no <|sound_NNNN|> tokens: add them with earful.models.vocab.add_sound_tokens")
        n = len(units)
        ids = [vocab[sound_token(i)] if sound_token(i) in vocab else None for i in range(n)]
        if units != list(range(n)) or ids != list(range(ids[0], ids[0] + n)):
            raise SoundVocabError(f"the tokenizer's {n} sound tokens are not <|sound_0000|>.. in one contiguous id range")
        missing = [m for m in MARKERS if m not in vocab]
        if missing:
            raise SoundVocabError(f"the tokenizer lacks the marker token(s) {missing}")
        return cls(n, ids[0], *(vocab[m] for m in MARKERS))


def add_sound_tokens(tokenizer, n_units: int) -> SoundVocab:
    """Add `n_units` sound tokens and the four markers (idempotent); returns where they sit."""
    from tokenizers import AddedToken

    if n_units < 1:
        raise SoundVocabError(f"n_units must be >= 1, found {n_units}")
    held = sum(1 for tok in tokenizer.get_vocab() if _SOUND.match(tok))
    if held and held != n_units:
        raise SoundVocabError(f"the tokenizer already held {held} sound tokens, {n_units} were asked for")
    # Special tokens: never split or normalised, and dropped by decode(skip_special_tokens=True),
    # so an ASR answer decodes to its text alone.
    new = [AddedToken(t, special=True, normalized=False) for t in [*(sound_token(i) for i in range(n_units)), *MARKERS]]
    tokenizer.add_tokens(new, special_tokens=True)
    return SoundVocab.from_tokenizer(tokenizer)


def extend_lm(model, tokenizer) -> None:
    """Grow the LM's embeddings (and untied output layer) to the tokenizer's length, new rows at the old mean."""
    old = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        logger.info("embeddings resized %d -> %d rows (new rows at the mean of the old)", old, len(tokenizer))
    model.config.vocab_size = model.get_input_embeddings().num_embeddings


def build_unit_lm(llm: str, n_units: int):
    """A causal LM by model spec, with `n_units` sound tokens added: (model, tokenizer, vocab)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..pretrained import resolve

    folder = resolve(llm)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    vocab = add_sound_tokens(tokenizer, n_units)
    extend_lm(model, tokenizer)
    set_generation_defaults(model, tokenizer)
    return model, tokenizer, vocab


def set_generation_defaults(model, tokenizer) -> None:
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class UnitLM:
    """A causal LM that reads and writes sound tokens, with what turns audio into them."""

    model: torch.nn.Module
    tokenizer: object
    vocab: SoundVocab
    audio_tokenizer: object | None = None  # earful.tokenizers.AudioTokenizer


def save_unit_lm(lm: UnitLM, folder: str | Path) -> None:
    """One `save_pretrained` folder (model + tokenizer) plus the sound vocabulary and audio tokenizer.

    Written into a hidden temporary folder and moved into place file by file, so a crash never
    leaves a half-written model file; other files already in `folder` (logs) are kept.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".save.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    lm.model.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    if lm.audio_tokenizer is not None:
        lm.audio_tokenizer.save_pretrained(tmp / AUDIO_TOKENIZER_DIR)
    (tmp / VOCAB_FILE).write_text(json.dumps(asdict(lm.vocab), indent=2) + "\n")
    for f in tmp.iterdir():
        target = folder / f.name
        if target.is_dir() and f.is_dir():
            shutil.rmtree(target)
        os.replace(f, target)
    tmp.rmdir()


def load_sound_lm(folder: str | Path, device: str | torch.device = "cpu") -> UnitLM:
    """A saved units LM's model, tokenizer and sound vocabulary (checked against each other), without
    its audio tokenizer: `earful.tokenizers.unit_lm.load_unit_lm` adds that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..pretrained import resolve

    folder = Path(resolve(str(folder)))
    if not (folder / VOCAB_FILE).is_file():
        raise SoundVocabError(f"{folder}: not a units LM folder (no {VOCAB_FILE}); train one with recipes/units_*.yaml")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = SoundVocab.from_tokenizer(tokenizer)
    saved = json.loads((folder / VOCAB_FILE).read_text())
    if saved != asdict(vocab):
        raise SoundVocabError(f"{folder / VOCAB_FILE} says {saved} but the tokenizer gives {asdict(vocab)}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return UnitLM(model, tokenizer, vocab)
