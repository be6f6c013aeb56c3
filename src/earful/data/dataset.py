"""Datasets over manifests, and batches grouped by length (padding is wasted compute)."""

from __future__ import annotations

import logging
import random
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..audio import AudioError, load_audio, resample
from ..models.configuration import place_audio
from .manifest import ManifestError, Utterance

logger = logging.getLogger(__name__)

def prompt_of(u: Utterance, default_prompt: str) -> str:
    """The user turn for an utterance: its own `prompt` (audio first unless it places `<|audio|>`)."""
    if not u.prompt:
        return default_prompt
    return place_audio(u.prompt)


def response_of(u: Utterance) -> str:
    """The target: an instruction's `response`, else the transcript (ASR)."""
    return u.response if u.response is not None else u.text


def usable_utterances(utterances: list[Utterance], sampling_rate: int, max_seconds: float | None, source: str,
                      check: Callable[[int, str], None] | None = None) -> tuple[list[Utterance], list[dict]]:
    """The utterances whose audio is usable, and a reject row for each other one.

    Every clip is decoded in full (as training will read it) before the first step, so a corrupt
    clip is found now and skipped, not met at a random step (and again on every `--resume`).
    `check(n_samples, name)` may raise `AudioError` for a clip the model cannot take (too short or
    too long for its encoder, at `sampling_rate`). Reject rows are {manifest, audio, id, error, reason}. A manifest with
    no usable clip at all is a `ManifestError`.
    """
    kept, rejects = [], []
    for u in tqdm(utterances, desc=f"checking audio of {source}", unit="clip", leave=False, mininterval=1.0):
        try:
            wave = load_audio(u.audio, sampling_rate, max_seconds=max_seconds)
            if check is not None:
                check(len(wave), u.audio)
        except AudioError as e:
            rejects.append({"manifest": source, "audio": u.audio, "id": u.id, "error": type(e).__name__, "reason": e.reason})
            continue
        kept.append(u)
    if not kept:
        first = rejects[0]
        raise ManifestError(f"{source}: none of its {len(utterances)} clips is usable (e.g. {first['audio']}: {first['reason']}); "
                            "fix or replace the audio, or check the manifest with `earful data ingest`")
    return kept, rejects


class SpeechDataset(torch.utils.data.Dataset):
    """Utterances with their audio loaded (validated, mono, resampled) through `earful.audio`.

    `speeds` adds speed-perturbed copies (Kaldi-style: tempo and pitch change together, by
    resampling), the classic cheap way to make a model hear new speakers: item i is utterance
    i % n at speed speeds[i // n], so with a frozen encoder each copy is encoded once and cached.
    """

    def __init__(self, utterances: list[Utterance], sampling_rate: int, default_prompt: str,
                 max_seconds: float | None = None, speeds: tuple[float, ...] = (1.0,)):
        self.utterances = utterances
        self.sampling_rate = sampling_rate
        self.default_prompt = default_prompt
        self.max_seconds = max_seconds
        self.speeds = tuple(speeds)

    def __len__(self) -> int:
        return len(self.utterances) * len(self.speeds)

    def utterance(self, i: int) -> Utterance:
        return self.utterances[i % len(self.utterances)]

    def clip(self, j: int) -> np.ndarray:
        """Utterance j's audio as recorded (no speed change): e.g. a talker for babble noise (data.augment)."""
        return load_audio(self.utterances[j].audio, self.sampling_rate, max_seconds=self.max_seconds)

    def __getitem__(self, i: int) -> dict:
        u, speed = self.utterance(i), self.speeds[i // len(self.utterances)]
        audio = self.clip(i % len(self.utterances))
        if speed != 1.0:
            # Played `speed` times faster: the same samples read as if recorded at rate * speed.
            audio = resample(audio, round(self.sampling_rate * speed), self.sampling_rate)
        return {"index": i, "audio": audio, "prompt": prompt_of(u, self.default_prompt), "response": response_of(u)}

    def lengths(self) -> list[float]:
        """Durations for length grouping (from the manifest, else 0: grouping then degrades to random)."""
        return [(u.duration or 0.0) / s for s in self.speeds for u in self.utterances]


def length_grouped_batches(lengths: list[float], batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """Batches of similar length, in random order.

    Shuffle, cut into mega-batches of 50 batches, sort each by length and cut into batches: every
    batch holds clips of similar length (little padding) while the order stays random, as in
    transformers' LengthGroupedSampler. Deterministic for a given seed, which makes resume exact.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def infinite_batches(lengths: list[float], batch_size: int, seed: int, start_epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batch index, indices) forever, epoch e shuffled with seed + e; resumable at any position."""
    epoch = start_epoch
    while True:
        batches = length_grouped_batches(lengths, batch_size, seed + epoch)
        for b in range(start_batch if epoch == start_epoch else 0, len(batches)):
            yield epoch, b, batches[b]
        epoch += 1
