"""Manifests: JSON Lines, one utterance a line — the contract every stage reads and writes.

Fields: `audio` (path, relative to the manifest's folder or absolute), `text` (transcript, may be
empty), optional `id`, `speaker`, `duration` (seconds), `prompt` / `response` (instruction data),
`words` (word timestamps: a list of {word, start, end} in seconds).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..atomic import replacing
from ..errors import EarfulError


class ManifestError(EarfulError, ValueError):
    """A manifest that cannot be used: missing, empty, or a line that is not a valid utterance."""


@dataclass
class Utterance:
    audio: str  # absolute path once read
    text: str = ""
    id: str | None = None
    speaker: str | None = None
    duration: float | None = None
    prompt: str | None = None
    response: str | None = None
    words: list | None = None  # word timestamps [{"word", "start", "end"}] (s), for interleaved sequences
    chosen: str | None = None  # preference data (DPO): the better answer to this audio ...
    rejected: str | None = None  # ... and the worse one

    def to_json(self, relative_to: Path | None = None) -> dict:
        row = {k: v for k, v in asdict(self).items() if v is not None}
        if relative_to is not None:
            try:
                row["audio"] = os.path.relpath(self.audio, relative_to)
            except ValueError:  # another drive on Windows
                pass
        return row


def json_lines(path: Path, what: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSON Lines file; errors name the line."""
    if not path.is_file():
        raise ManifestError(f"{path}: {what} not found")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{n}: not JSON ({e.msg})") from None


def absolute_audio(path: Path, audio: str) -> str:
    """An audio path from a file at `path`: absolute as given, else relative to that file's folder."""
    p = Path(audio)
    return str(p if p.is_absolute() else (path.parent / p).resolve())


def read_manifest(path: str | Path) -> list[Utterance]:
    """All utterances of a manifest, with `audio` made absolute. Errors name the line."""
    path = Path(path)
    rows = []
    known = set(Utterance.__dataclass_fields__)
    for n, row in json_lines(path, "manifest"):
        if not isinstance(row, dict) or not isinstance(row.get("audio"), str):
            raise ManifestError(f"{path}:{n}: each line needs an 'audio' path")
        row = {k: v for k, v in row.items() if k in known}
        row["audio"] = absolute_audio(path, row["audio"])
        rows.append(Utterance(**row))
    if not rows:
        raise ManifestError(f"{path}: manifest holds no utterances")
    return rows


def write_manifest(utterances: Iterable[Utterance], path: str | Path, relative: bool = True) -> int:
    """Write atomically (temp file + rename): a crash never leaves a half-written manifest."""
    path = Path(path)
    n = 0
    with replacing(path, "w") as f:
        for u in utterances:
            row = u.to_json(path.parent.resolve() if relative else None)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
