"""Token sequences a discrete speech LM trains on, one layout per task.

Symbols: U = sound tokens (an utterance's units as LM ids), T = text tokens, and the markers
[S> <S] (`<|sound_start|>`, `<|sound_end|>`) and [T> <T] (`<|text_start|>`, `<|text_end|>`).
Labels are the ids the loss is taken on (-100 elsewhere); the model shifts them itself, as every
transformers causal LM does.

    speech       [S> U <S]                      Slam / GSLM continuation: loss on all but [S>
    asr          [S> U <S] [T> T <T]            loss on T <T (the answer)
    tts          [T> T <T] [S> U <S]            loss on U <S
    interleaved  [T> T <T] [S> U <S] [T> ..     SpiritLM: spans of words alternate between text
                                                and speech at word boundaries (word timestamps)
    aligned      [S> U U [T> T <T] U U .. <S]   the Mistral / Kyutai delayed streams: all the
                                                speech, each word's text inserted `delay` seconds
                                                after the word starts (delay < 0: text first)

`interleaved` and `aligned` cut units at word times, so they take frame-aligned units (one per
audio frame, not deduplicated); runs inside a speech span are then collapsed if `dedup`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..models.vocab import SoundVocab
from ..tokenizers import deduplicate
from ..errors import EarfulError

FORMATS = ("speech", "asr", "tts", "interleaved", "aligned")
IGNORE = -100


class SequenceError(EarfulError, ValueError):
    """Input that a sequence format cannot lay out (e.g. interleaving without word timestamps)."""


@dataclass
class Word:
    word: str
    start: float  # seconds
    end: float


@dataclass
class TokenSequence:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def speech(vocab: SoundVocab, units: list[int]) -> TokenSequence:
    ids = [vocab.sound_start_id, *vocab.token_ids(units), vocab.sound_end_id]
    return TokenSequence(ids, [IGNORE, *ids[1:]])


def asr_prompt(vocab: SoundVocab, units: list[int]) -> list[int]:
    """What an ASR answer is generated after: [S> U <S] [T>."""
    return [vocab.sound_start_id, *vocab.token_ids(units), vocab.sound_end_id, vocab.text_start_id]


def asr(vocab: SoundVocab, tokenizer, units: list[int], text: str) -> TokenSequence:
    prompt, answer = asr_prompt(vocab, units), [*_text_ids(tokenizer, text), vocab.text_end_id]
    return TokenSequence(prompt + answer, [IGNORE] * len(prompt) + answer)


def tts(vocab: SoundVocab, tokenizer, text: str, units: list[int]) -> TokenSequence:
    prompt = [vocab.text_start_id, *_text_ids(tokenizer, text), vocab.text_end_id, vocab.sound_start_id]
    answer = [*vocab.token_ids(units), vocab.sound_end_id]
    return TokenSequence(prompt + answer, [IGNORE] * len(prompt) + answer)


PREFERENCE_FORMATS = ("speech", "asr", "interleaved")


def preference(vocab: SoundVocab, tokenizer, prompt: list[int], fmt: str, answer_units: list[int] | None = None,
               answer_text: str | None = None) -> TokenSequence:
    """A DPO sequence: `prompt` (no loss) then one answer, speech (`answer_units`) or text, with the loss on it.

    `prompt` is the prompt audio laid out in `fmt` (`preference_prompt`). Speech continues the
    prompt's open sound span in `speech` ([S> U | U' <S]); after an interleaved prompt, which ends
    with a closed span, it opens its own ([S> U' <S]), and text comes as [T> T <T]. In `asr` the
    answer is a transcript after [S> U <S] [T> (T <T]).
    """
    if (answer_units is None) == (answer_text is None):
        raise ValueError("a preference answer is speech or text, exactly one of them")
    if answer_units is not None:
        if fmt == "asr":
            raise SequenceError("an asr preference pair answers with text, found audio")
        answer = [*vocab.token_ids(answer_units), vocab.sound_end_id]
        if fmt != "speech":
            answer = [vocab.sound_start_id, *answer]
    else:
        body = _text_ids(tokenizer, answer_text if fmt == "asr" else " " + answer_text)
        answer = [*body, vocab.text_end_id] if fmt == "asr" else [vocab.text_start_id, *body, vocab.text_end_id]
        if fmt == "speech":
            answer = [vocab.sound_end_id, *answer]
    return TokenSequence(prompt + answer, [IGNORE] * len(prompt) + answer)


def preference_prompt(vocab: SoundVocab, tokenizer, units: list[int], fmt: str, frame_rate: float = 50.0,
                      words: list[Word] | None = None, rng: random.Random | None = None, max_span_words: int = 3,
                      dedup: bool = True, tokens_per_frame: int = 1) -> list[int]:
    """The prompt audio of a preference pair in `fmt`: [S> U (open) | [S> U <S] [T> | interleaved spans."""
    if fmt == "speech":
        return [vocab.sound_start_id, *vocab.token_ids(units)]
    if fmt == "asr":
        return asr_prompt(vocab, units)
    if fmt == "interleaved":
        return interleaved(vocab, tokenizer, units, frame_rate, words or [], rng or random.Random(0), max_span_words,
                           dedup, tokens_per_frame).input_ids
    raise SequenceError(f"preference pairs are laid out in {', '.join(PREFERENCE_FORMATS)}, not {fmt!r}")


def _cut(t: float, frame_rate: float, n_tokens: int, tokens_per_frame: int) -> int:
    """Token index where time t falls: the first whole frame at or after t (codec frames stay whole)."""
    frame = math.ceil(round(t * frame_rate, 6))
    return min(max(frame * tokens_per_frame, 0), n_tokens)


def interleaved(vocab: SoundVocab, tokenizer, units: list[int], frame_rate: float, words: list[Word],
                rng: random.Random, max_span_words: int = 3, dedup: bool = True, tokens_per_frame: int = 1) -> TokenSequence:
    """Spans of 1..max_span_words words, alternating text and speech, the first modality at random.

    A speech span covers the frames from its first word's start to the next span's first word's
    start (the pause after a word belongs to it); the first span starts at 0, the last ends at the end.
    """
    if not words:
        raise SequenceError("interleaving needs word timestamps (a manifest's 'words'), found none")
    n = len(units)
    spans, i = [], 0
    while i < len(words):
        size = rng.randint(1, max_span_words)
        spans.append(words[i : i + size])
        i += size
    speak = rng.random() < 0.5
    ids: list[int] = []
    for s, span in enumerate(spans):
        if speak:
            a = 0 if s == 0 else _cut(span[0].start, frame_rate, n, tokens_per_frame)
            b = n if s == len(spans) - 1 else _cut(spans[s + 1][0].start, frame_rate, n, tokens_per_frame)
            chunk = units[a:b]
            ids += [vocab.sound_start_id, *vocab.token_ids(deduplicate(chunk) if dedup else chunk), vocab.sound_end_id]
        else:
            text = " ".join(w.word for w in span)
            ids += [vocab.text_start_id, *_text_ids(tokenizer, text if s == 0 else " " + text), vocab.text_end_id]
        speak = not speak
    return TokenSequence(ids, [IGNORE, *ids[1:]])


def aligned(vocab: SoundVocab, tokenizer, units: list[int], frame_rate: float, words: list[Word],
            delay: float = 0.0, dedup: bool = True, tokens_per_frame: int = 1) -> TokenSequence:
    """All the speech, with word w's text inserted before the frame at w.start + delay seconds."""
    if not words:
        raise SequenceError("the aligned format needs word timestamps (a manifest's 'words'), found none")
    n = len(units)
    cuts = [_cut(w.start + delay, frame_rate, n, tokens_per_frame) for w in words]  # non-decreasing: words are in time order
    ids, prev = [vocab.sound_start_id], 0
    for w, (cut, word) in enumerate(zip(cuts, words)):
        chunk = units[prev:cut]
        ids += vocab.token_ids(deduplicate(chunk) if dedup else chunk)
        ids += [vocab.text_start_id, *_text_ids(tokenizer, word.word if w == 0 else " " + word.word), vocab.text_end_id]
        prev = cut
    chunk = units[prev:]
    ids += [*vocab.token_ids(deduplicate(chunk) if dedup else chunk), vocab.sound_end_id]
    return TokenSequence(ids, [IGNORE, *ids[1:]])


def words_of(raw: list[dict] | None, text: str, duration: float | None, path: str) -> list[Word]:
    """Word timestamps from a manifest row; a one-word transcript without them spans the whole clip."""
    if raw:
        try:
            words = [Word(str(w["word"]), float(w["start"]), float(w["end"])) for w in raw]
        except (KeyError, TypeError, ValueError):
            raise SequenceError(f"{path}: 'words' must be a list of {{word, start, end}} objects, found {raw[:2]!r}") from None
        if any(b.start < a.start for a, b in zip(words, words[1:])):
            raise SequenceError(f"{path}: word timestamps are not in time order")
        return words
    if len(text.split()) == 1 and duration:
        return [Word(text.strip(), 0.0, duration)]
    raise SequenceError(f"{path}: no word timestamps ('words') for a {len(text.split())}-word transcript; "
                        "interleaved and aligned formats need them")
