"""`earful data synth`: text -> speech with the project's own voices, as a manifest.

Two kinds of input:
- `--text FILE`: one utterance a line -> ASR data (audio + its transcript);
- `--instructions FILE`: instruction data (JSON Lines or parquet with `prompt`/`response`,
  `instruction`/`output` (+ `input`), or `question`/`answer`) -> spoken instructions as Ichigo
  makes them: the audio speaks the prompt, `prompt` is `<|audio|>` alone, `response` is the answer.

Voices (`--voices`, used in turn, one per utterance): `piper` (the bundled Piper voice, with a
speaking rate varied per utterance), `piper:VOICE.onnx`, and `espeak:NAME` (espeak-ng's own voices:
`en-us`, `en+f2`, `en-us+m3`, `en-gb-scotland`, ...). Output is 16 kHz 16-bit WAV. A rerun keeps
what it wrote before; a line that cannot be spoken is a reject with its reason.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from .. import atomic
from ..audio import resample
from .manifest import Utterance, write_manifest
from .sentences import voice_slug
from .synth import PiperVoice

DEFAULT_VOICES = "piper,espeak:en-us+m3,espeak:en+f2,espeak:en-gb-scotland"
OUT_RATE = 16000
PROMPT_KEYS = (("prompt", "response"), ("instruction", "output"), ("question", "answer"))


@dataclass
class Line:
    text: str  # what is spoken
    response: str | None = None  # instruction data: the answer


def read_lines(path: str | Path) -> list[Line]:
    return [Line(t.strip()) for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]


def read_instructions(path: str | Path) -> list[Line]:
    path = Path(path)
    if path.suffix in (".parquet", ".arrow"):
        from datasets import Dataset, load_dataset

        ds = Dataset.from_file(str(path)) if path.suffix == ".arrow" else load_dataset("parquet", data_files=[str(path)], split="train")
        rows = list(ds)
    else:
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    out = []
    for i, row in enumerate(rows):
        keys = next(((p, r) for p, r in PROMPT_KEYS if p in row and r in row), None)
        if keys is None:
            raise ValueError(f"{path}: row {i + 1} has none of prompt/response, instruction/output, question/answer: {sorted(row)}")
        prompt = str(row[keys[0]]).strip()
        if row.get("input"):
            prompt = f"{prompt}\n{row['input']}".strip()
        out.append(Line(prompt, str(row[keys[1]]).strip()))
    return out


class _Voices:
    def __init__(self, spec: str, seed: int):
        from .synth import EspeakVoice, PiperVoice, split_voice_list, voice_from_name

        self.voices = []
        for item in split_voice_list(spec):
            kind, _, arg = item.partition(":")
            if kind == "kokoro" or "@" in arg or (kind == "piper" and arg and not arg.endswith(".onnx")):
                self.voices.append((item, voice_from_name(item)))  # a catalogue name (`earful data voices`)
            elif kind == "piper":
                self.voices.append((f"piper-{Path(arg).stem}" if arg else "piper", PiperVoice.load(arg or None)))
            elif kind == "espeak":
                self.voices.append((f"espeak-{arg or 'en-us'}", EspeakVoice(arg or "en-us")))
            else:
                raise ValueError(f"unknown voice {item!r}: use piper, piper:VOICE.onnx, espeak:NAME or a name `earful data voices` lists")
        if not self.voices:
            raise ValueError("no voices given")
        self.rng = random.Random(seed)

    def speak(self, i: int, text: str, length_scale: float) -> tuple[str, np.ndarray]:
        name, voice = self.voices[i % len(self.voices)]
        if isinstance(voice, PiperVoice):
            wave = voice.synthesize(text, length_scale=length_scale)
        else:
            wave = voice.synthesize(text)
        return name, resample(wave, voice.sample_rate, OUT_RATE).clip(-1.0, 1.0)


def synthesize_corpus(lines: list[Line], out_dir: str | Path, *, voices: str = DEFAULT_VOICES, seed: int = 0,
                      max_chars: int = 600, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    speakers = _Voices(voices, seed)
    rows, rejects = [], []
    for i, line in enumerate(tqdm(lines, desc="synthesising", unit="utt", disable=not progress)):
        name = speakers.voices[i % len(speakers.voices)][0]
        length_scale = speakers.rng.uniform(0.9, 1.15)  # drawn for every line: a rerun gets the same rates
        path = out_dir / "audio" / f"{i:07d}-{voice_slug(name)}.wav"
        try:
            if len(line.text) > max_chars:
                raise ValueError(f"{len(line.text)} characters, over --max-chars {max_chars}")
            if not path.exists():
                _, wave = speakers.speak(i, line.text, length_scale)
                tmp = path.with_name(f".{path.stem}.tmp.{os.getpid()}.wav")
                sf.write(tmp, wave, OUT_RATE, subtype="PCM_16")
                os.replace(tmp, path)
            duration = round(sf.info(path).duration, 4)
        except (ValueError, RuntimeError) as e:
            rejects.append({"line": i + 1, "text": line.text[:200], "error": type(e).__name__, "reason": str(e)})
            continue
        if line.response is None:
            rows.append(Utterance(audio=str(path), text=line.text, id=path.stem, speaker=name, duration=duration))
        else:
            rows.append(Utterance(audio=str(path), text=line.text, id=path.stem, speaker=name, duration=duration,
                                  prompt="<|audio|>", response=line.response))
    write_manifest(rows, out_dir / "manifest.jsonl")
    atomic.write_jsonl(out_dir / "rejects.jsonl", rejects)
    return {"in": len(lines), "out": len(rows), "rejected": len(rejects), "hours": round(sum(r.duration for r in rows) / 3600, 4),
            "voices": [n for n, _ in speakers.voices]}
