"""A multi-voice sentence corpus made offline, split by voice: `earful data prepare sentences`.

The text is `text/sentences.txt` beside this file (English sentences the bundled SmolLM2 wrote,
see `text/README.md`), or any file of one sentence a line. Every voice of the catalogue
(`earful.data.synth.voice_catalogue()`: Piper variants, espeak-ng accents x variants, Kokoro
styles and their mixtures) speaks `per_voice` of them. The split is by voice: a held-out voice
is never heard in training, so it stands in for the users a model has never heard; and the
sentences are split too (80/10/10), so no test sentence is ever spoken in training either.

    OUT/audio/VOICE/0000.wav     16 kHz 16-bit PCM, written atomically; a rerun keeps them
    OUT/{train,dev,test}.jsonl   manifests (speaker = the voice's catalogue name)
    OUT/voices.json              which voices are in which split, the sentence source, the settings

Voices and held-out sets are given as comma lists of names or patterns (`*` matches anything):
`all`, a family (`kokoro`), `espeak:en-029*`, `kokoro:*jf_nezumi*`, `piper:joe@len1.2,noise0.5`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import random
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import EarfulError
from .manifest import Utterance, write_manifest

logger = logging.getLogger(__name__)

SENTENCES_FILE = Path(__file__).with_name("text") / "sentences.txt"
SPLITS = ("train", "dev", "test")
SENTENCE_FRACTIONS = (0.8, 0.1, 0.1)  # train / dev / test share of the sentences
OUT_RATE = 16000
# Held out by default: one Kokoro style with every mixture and speed of it, one espeak-ng accent
# with all its variants, two variants in every accent, and one Piper setting, per split.
DEFAULT_TEST_VOICES = ("kokoro:*jf_nezumi*", "espeak:en-029*", "espeak:*+f4", "espeak:*+grandpa", "piper:joe@len1.3,noise0.6")
DEFAULT_DEV_VOICES = ("kokoro:*jf_tebukuro*", "espeak:en-gb-x-gbcwmd*", "espeak:*+m5", "espeak:*+linda", "piper:joe@len0.8,noise0.4")


class CorpusError(EarfulError, ValueError):
    """Settings that cannot make a corpus: an unknown voice, an empty split, a folder made otherwise."""


def read_sentences(path: str | Path | None = None) -> list[str]:
    """The sentences of a file, one a line; blank lines and lines starting with `#` are skipped."""
    path = Path(path) if path is not None else SENTENCES_FILE
    if not path.is_file():
        raise CorpusError(f"{path}: sentence file not found (one sentence a line)")
    lines = [" ".join(t.split()) for t in path.read_text(encoding="utf-8").splitlines()]
    sentences = [t for t in lines if t and not t.startswith("#")]
    if not sentences:
        raise CorpusError(f"{path}: holds no sentences (one a line; # starts a comment)")
    return sentences


def voice_slug(name: str) -> str:
    """A file-name-safe form of a voice name: kokoro:mix(jm_kumo,jf_alpha,0.5) -> kokoro_mix_jm_kumo_jf_alpha_0.5."""
    return re.sub(r"[^A-Za-z0-9+._-]+", "_", name).strip("_")


def select_voices(spec: str | Iterable[str], flag: str = "--voices", catalogue: list[str] | None = None) -> list[str]:
    """Voice names from a comma list of names, patterns, families or `all`, in catalogue order.

    A pattern or family matches catalogue names; a name outside the catalogue (other settings,
    e.g. espeak:en-us+m3@rate140,pitch30) is taken as given once `voice_from_name` would accept
    it. Each item must match something, else a `CorpusError` names `flag` and the item.
    """
    from .synth import VOICE_FAMILIES, VoiceNameError, split_voice_list, voice_catalogue

    catalogue = voice_catalogue() if catalogue is None else catalogue
    items = split_voice_list(spec) if isinstance(spec, str) else list(spec)
    if not items:
        raise CorpusError(f"{flag}: expected a comma list of voice names or patterns, found {spec!r}")
    chosen: list[str] = []
    for item in items:
        pattern = "*" if item == "all" else f"{item}:*" if item in VOICE_FAMILIES else item
        found = fnmatch.filter(catalogue, pattern) if any(c in pattern for c in "*?[") else [pattern] if pattern in catalogue else []
        if not found and not any(c in pattern for c in "*?["):
            try:
                _check_voice_name(item)
            except VoiceNameError as e:
                raise CorpusError(f"{flag}: {e}") from None
            found = [item]
        if not found:
            raise CorpusError(f"{flag}: {item!r} matches no voice (`earful data voices` lists them)")
        chosen += [v for v in found if v not in chosen]
    order = {v: i for i, v in enumerate(catalogue)}
    return sorted(chosen, key=lambda v: order.get(v, len(order)))


def _check_voice_name(name: str) -> None:
    """Raise VoiceNameError if `voice_from_name` would; cheap (no model loaded) for every family."""
    from . import synth

    if synth.voice_family(name) == "kokoro":  # check the style names and settings without loading the model
        rest = name.partition(":")[2].partition("@")
        styles = re.findall(r"[a-z]+_[a-z]+", rest[0])
        if not styles or any(s not in synth.KOKORO_STYLES for s in styles):
            raise synth.VoiceNameError(f"voice {name!r}: Kokoro's styles are {', '.join(synth.KOKORO_STYLES)} (or mix(A,B,W) of two)")
        synth._settings(name, rest[2], {"speed": (0.5, 2.0)})
    else:  # espeak has no model to load, Piper's loads once per process; unknown families raise
        synth.voice_from_name(name)


def split_voices(voices: list[str], dev: Iterable[str], test: Iterable[str], *, strict: bool = True) -> dict[str, list[str]]:
    """{split: voices}: a voice matching a test pattern is test, else one matching a dev pattern is dev,
    else train. With `strict`, a pattern that matches none of `voices` is an error naming its flag."""
    dev, test = list(dev), list(test)
    for flag, patterns in (("--dev-voices", dev), ("--test-voices", test)):
        for p in patterns:
            if strict and not fnmatch.filter(voices, p):
                raise CorpusError(f"{flag}: {p!r} matches none of the chosen voices")
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for v in voices:
        split = "test" if any(fnmatch.fnmatchcase(v, p) for p in test) else "dev" if any(fnmatch.fnmatchcase(v, p) for p in dev) else "train"
        out[split].append(v)
    for split in ("train", "test"):
        if not out[split]:
            raise CorpusError(f"no voice is left for {split} (voices {', '.join(voices)}); "
                              f"{'hold out fewer voices' if split == 'train' else 'give --test-voices'}")
    return out


def split_sentences(sentences: list[str], seed: int) -> dict[str, list[str]]:
    """Shuffled (seeded) into disjoint train/dev/test pools of 80/10/10%; duplicates kept in one pool."""
    unique = list(dict.fromkeys(sentences))
    if len(unique) < 3:
        raise CorpusError(f"need at least 3 distinct sentences to split them three ways, found {len(unique)}")
    random.Random(seed).shuffle(unique)
    n_dev = max(1, round(len(unique) * SENTENCE_FRACTIONS[1]))
    n_test = max(1, round(len(unique) * SENTENCE_FRACTIONS[2]))
    return {"test": unique[:n_test], "dev": unique[n_test : n_test + n_dev], "train": unique[n_test + n_dev :]}


def voice_sentences(pool: list[str], voice: str, n: int, seed: int) -> list[str]:
    """`n` sentences of `pool` for one voice: without repeats until the pool is used up.
    Seeded by (seed, voice) alone, so adding or removing other voices changes nothing here."""
    rng = random.Random(f"{seed}:{voice}")
    out: list[str] = []
    while len(out) < n:
        out += rng.sample(pool, min(len(pool), n - len(out)))
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_sentences(out_dir: str | Path, *, voices: str | Iterable[str] = "all", per_voice: int = 20, seed: int = 0,
                      dev_voices: str | Iterable[str] | None = None, test_voices: str | Iterable[str] | None = None,
                      text: str | Path | None = None, progress: bool = True) -> dict:
    """Speak `per_voice` sentences with every chosen voice into OUT_DIR (see the module docstring).

    `dev_voices` / `test_voices` default to `DEFAULT_DEV_VOICES` / `DEFAULT_TEST_VOICES` (only the
    patterns that match a chosen voice). A rerun with the same settings keeps the files written
    before; a folder made with other settings is refused. Returns the summary also in voices.json.
    """
    import soundfile as sf
    from tqdm.auto import tqdm

    from .. import atomic
    from ..audio import resample
    from .synth import split_voice_list, voice_family, voice_from_name

    if per_voice < 1:
        raise CorpusError(f"--per-voice must be at least 1, found {per_voice}")
    out_dir = Path(out_dir)
    source = Path(text) if text is not None else SENTENCES_FILE
    sentences = read_sentences(source)
    chosen = select_voices(voices)

    def patterns(given, default):  # the defaults: only those that match a chosen voice
        if given is None:
            return [p for p in default if fnmatch.filter(chosen, p)]
        return split_voice_list(given) if isinstance(given, str) else list(given)

    dev, test = patterns(dev_voices, DEFAULT_DEV_VOICES), patterns(test_voices, DEFAULT_TEST_VOICES)
    by_split = split_voices(chosen, dev, test, strict=dev_voices is not None or test_voices is not None)
    pools = split_sentences(sentences, seed)

    settings = {"seed": seed, "per_voice": per_voice, "source_sha256": _sha256(source)}
    report_path = out_dir / "voices.json"
    if report_path.is_file():
        before = json.loads(report_path.read_text(encoding="utf-8"))
        old = {k: before.get("settings", {}).get(k) for k in settings}
        if old != settings:
            raise CorpusError(f"{out_dir} was made with other settings ({old}, now {settings}); "
                              "give a new OUT_DIR or the same --seed, --per-voice and text")
    else:  # before any audio, so that a run killed midway is resumed only with the same settings
        atomic.write_json(report_path, {"settings": settings, "complete": False})

    jobs = [(split, v, k, s) for split in SPLITS for v in by_split[split]
            for k, s in enumerate(voice_sentences(pools[split], v, per_voice, seed))]
    loaded: dict[str, object] = {}
    rows: dict[str, list[Utterance]] = {s: [] for s in SPLITS}
    written = 0
    for split, name, k, sentence in tqdm(jobs, desc="speaking sentences", unit="utt", disable=not progress):
        path = out_dir / "audio" / voice_slug(name) / f"{k:04d}.wav"
        if path.is_file():
            duration = sf.info(str(path)).duration
        else:
            if name not in loaded:
                loaded[name] = voice_from_name(name)
            voice = loaded[name]
            wave = np.clip(resample(voice.synthesize(sentence), voice.sample_rate, OUT_RATE), -1.0, 1.0)  # (T,)
            with atomic.replacing(path) as f:
                sf.write(f, wave, OUT_RATE, subtype="PCM_16", format="WAV")
            duration = len(wave) / OUT_RATE
            written += 1
        rows[split].append(Utterance(audio=str(path.resolve()), text=sentence, id=f"{voice_slug(name)}-{k:04d}",
                                     speaker=name, duration=round(duration, 4)))
    for split in SPLITS:
        if rows[split]:
            write_manifest(rows[split], out_dir / f"{split}.jsonl")
    hours = {s: round(sum(u.duration for u in rows[s]) / 3600, 4) for s in SPLITS}
    families = {s: {f: sum(voice_family(v) == f for v in by_split[s]) for f in ("piper", "espeak", "kokoro")} for s in SPLITS}
    summary = {
        "splits": by_split,
        "utterances": {s: len(rows[s]) for s in SPLITS},
        "hours": hours,
        "families": families,
        "sentences": {s: len(pools[s]) for s in SPLITS},
        "held_out_patterns": {"dev": dev, "test": test},
        "source": {"path": str(source), "sentences": len(sentences),
                   "about": [t[1:].strip() for t in source.read_text(encoding="utf-8").splitlines() if t.startswith("#")]},
        "settings": settings,
        "written_now": written,
        "complete": True,
    }
    atomic.write_json(report_path, summary)
    logger.info("wrote %s: %s utterances (%d written now)", out_dir, summary["utterances"], written)
    return summary
