"""`earful data ingest`: raw audio from anywhere -> a checked manifest, with every reject explained.

Sources (any mix, one command):
- a folder tree of audio (transcripts from sidecar `NAME.txt` / `NAME.lab` files, or a CSV given
  with --transcripts, or none);
- an audio file; an existing manifest (`.jsonl`); a CSV with `audio` and `text` columns;
- a Hugging Face `datasets` dataset with an Audio column: local `.parquet` / `.arrow` files, or
  `hf:NAME` (a hub dataset, for users with the hub);
- URLs (http(s), `file://` with --enable-file-urls) or search queries (`ytsearch3:...`), or a `.txt`
  file listing them, fetched with yt-dlp (the optional `ingest` extra).

Every clip is decoded in full by `earful.audio` (so truncation and NaN are caught, in every
format, the way every other verb reads it), its duration measured, and it is kept or rejected:
unreadable, empty, not audio, non-finite, silent, too short or too long. Kept clips in formats only
ffmpeg reads (m4a, webm, aac, ...) are converted to FLAC, which the trainer then reads without a
subprocess. Writes OUT/manifest.jsonl, OUT/rejects.jsonl and OUT/summary.json (in = out +
rejected), each atomically; fetched, extracted or converted audio goes to OUT/audio/.

Ids and file names are unique and the same on every run over the same sources: a file's id is its
path, without the extension, relative to the folder all the file sources share (`a/x` and `b/x`
for `a/x.m4a` and `b/x.m4a`; `x` when one folder is ingested); manifests keep their ids, datasets
and URLs get theirs from the dataset and the site. An id that still repeats gets a tag of its
file's path (`x-1f0c2a9e`), and written files always carry one, so two sources never write one file.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import atomic
from ..audio import DEFAULT_MAX_SECONDS, AudioError, find_ffmpeg, load_audio
from .manifest import Utterance, read_manifest, write_manifest
from ..errors import EarfulError

logger = logging.getLogger(__name__)

SOUNDFILE_EXTS = {".wav", ".flac", ".ogg", ".oga", ".mp3"}
FFMPEG_EXTS = {".m4a", ".mp4", ".webm", ".opus", ".aac", ".wma", ".mkv", ".mov", ".amr", ".aiff", ".aif"}
AUDIO_EXTS = SOUNDFILE_EXTS | FFMPEG_EXTS
TEXT_COLUMNS = ("text", "sentence", "transcript", "transcription", "normalized_text")
URL_RE = re.compile(r"^(https?://|file://|ytsearch\d*:|ytdl:)", re.I)
CHECK_RATE = 16000


class AudioSilent(AudioError):
    """Nothing above the silence threshold."""


class IngestError(EarfulError, ValueError):
    """A source that cannot be ingested at all (the whole source, not one clip)."""


@dataclass
class Candidate:
    audio: str
    source: str
    text: str = ""
    id: str | None = None  # None: named after its path relative to the sources' common folder
    speaker: str | None = None
    extra: dict = field(default_factory=dict)
    root: str | None = None  # the folder its id is relative to at most (default: its own folder)


def ffmpeg_exe() -> str:
    exe = find_ffmpeg()
    if exe is None:
        raise IngestError("this needs ffmpeg: pip install 'earful[ingest]' (imageio-ffmpeg ships the binary)")
    return exe


# -- names ---------------------------------------------------------------------------------------
def tag(text: str) -> str:
    """8 hex digits of sha256: a short, stable mark that tells two sources apart."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def path_tag(path: str | Path) -> str:
    """`tag` of the absolute path: files of one name in different folders get different tags."""
    return tag(os.path.abspath(path))


def safe_name(text: str, limit: int = 80) -> str:
    """`text` as one file name: path separators and odd characters become `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:limit] or "clip"


def relative_ids(paths: list[str], roots: list[str]) -> list[str]:
    """Each path relative to the folder all `roots` share, without its extension (POSIX separators)."""
    if not paths:
        return []
    common = os.path.commonpath([os.path.abspath(r) for r in roots])
    return [Path(os.path.splitext(os.path.relpath(os.path.abspath(p), common))[0]).as_posix() for p in paths]


def unique_ids(ids: list[str], paths: list[str]) -> list[str]:
    """`ids` with each one that repeats made unique by its file's `path_tag`, then by -2, -3, ...
    for the same file listed again; ids that do not repeat stay as they are."""
    counts = Counter(ids)
    out, used = [], set()
    for i, p in zip(ids, paths):
        base = i if counts[i] == 1 else f"{i}-{path_tag(p)}"
        new, n = base, 1
        while new in used:
            n += 1
            new = f"{base}-{n}"
        used.add(new)
        out.append(new)
    repeated = sum(c for c in counts.values() if c > 1)
    if repeated:
        logger.info("%d clips shared an id with another; each now ends in a tag of its path", repeated)
    return out


def assign_ids(candidates: list[Candidate]) -> None:
    """Give every candidate a unique id (see the module docstring), in place."""
    unnamed = [c for c in candidates if not c.id]
    ids = relative_ids([c.audio for c in unnamed], [c.root or str(Path(c.audio).parent) for c in unnamed])
    for c, i in zip(unnamed, ids):
        c.id = i
    for c, i in zip(candidates, unique_ids([c.id for c in candidates], [c.audio for c in candidates])):
        c.id = i


# -- sources -> candidates ----------------------------------------------------------------------
def _read_transcripts_csv(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    keys = rows[0].keys()
    audio_key = next((k for k in ("audio", "file", "path", "filename") if k in keys), None)
    text_key = next((k for k in TEXT_COLUMNS if k in keys), None)
    if audio_key is None or text_key is None:
        raise IngestError(f"{path}: a transcripts CSV needs an audio/file/path column and a text column, found {', '.join(keys)}")
    return {r[audio_key]: r[text_key] for r in rows}


def _sidecar_text(audio: Path) -> str | None:
    for ext in (".txt", ".lab"):
        side = audio.with_suffix(ext)
        if side.is_file():
            return side.read_text(encoding="utf-8").strip()
    return None


def from_folder(folder: Path, transcripts: dict[str, str] | None) -> list[Candidate]:
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTS):
        rel = path.relative_to(folder).as_posix()
        text = None
        if transcripts is not None:
            text = transcripts.get(rel, transcripts.get(path.name, transcripts.get(path.stem)))
        if text is None:
            text = _sidecar_text(path)
        out.append(Candidate(os.path.abspath(path), str(folder), text or "", root=os.path.abspath(folder)))
    return out


def from_csv(path: Path) -> list[Candidate]:
    """Rows of a CSV: each audio path relative to the CSV's folder, and named by that path."""
    return [Candidate(os.path.abspath(path.parent / a), str(path), t, root=os.path.abspath(path.parent))
            for a, t in _read_transcripts_csv(path).items()]


def from_manifest(path: Path) -> list[Candidate]:
    return [Candidate(u.audio, str(path), u.text, id=u.id, speaker=u.speaker,
                      extra={k: v for k, v in (("prompt", u.prompt), ("response", u.response)) if v is not None})
            for u in read_manifest(path)]


def from_dataset(spec: str, audio_dir: Path, split: str = "train") -> list[Candidate]:
    """Rows of a `datasets` dataset; each clip's encoded bytes are written out unchanged."""
    try:
        from datasets import Audio, Dataset, load_dataset
    except ImportError:
        raise IngestError("datasets sources need: pip install 'earful[ingest]'") from None
    if spec.startswith("hf:"):
        ds = load_dataset(spec[3:], split=split)
    elif spec.endswith(".arrow"):
        ds = Dataset.from_file(spec)
    else:
        ds = load_dataset("parquet", data_files=[spec], split="train")
    audio_col = next((c for c, f in ds.features.items() if isinstance(f, Audio)), "audio" if "audio" in ds.column_names else None)
    if audio_col is None:
        raise IngestError(f"{spec}: no Audio column (columns: {', '.join(ds.column_names)})")
    ds = ds.cast_column(audio_col, Audio(decode=False))  # bytes as stored: decoded by earful.audio
    text_col = next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    prefix = safe_name(Path(spec.removeprefix("hf:")).stem, 40)
    # Two datasets of one name (a/train.parquet, b/train.parquet) must not write the same files.
    files = f"{prefix}-{tag(spec) if spec.startswith('hf:') else path_tag(spec)}"
    audio_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, row in enumerate(ds):
        a = row[audio_col] or {}
        ext = Path(a.get("path") or "").suffix.lower() or ".wav"
        target = audio_dir / f"{files}-{i:08d}{ext if ext in AUDIO_EXTS else '.wav'}"
        if a.get("bytes"):
            atomic.write_bytes(target, a["bytes"])
            audio = str(target)
        else:  # a dataset that points at files instead of holding them
            audio = a.get("path") or f"{spec}[{i}] (no audio)"
        out.append(Candidate(audio, spec, (row.get(text_col) or "") if text_col else "", id=f"{prefix}-{i:08d}"))
    return out


def from_urls(urls: list[str], audio_dir: Path, enable_file_urls: bool) -> tuple[list[Candidate], list[dict]]:
    """Fetch with yt-dlp: each URL (or each result of a search) becomes one candidate."""
    try:
        import yt_dlp
    except ImportError:
        raise IngestError("URL sources need yt-dlp: pip install 'earful[ingest]'") from None
    audio_dir.mkdir(parents=True, exist_ok=True)
    opts = {
        "format": "bestaudio/best",
        "quiet": True, "no_warnings": True, "noprogress": True,
        "enable_file_urls": enable_file_urls,
        "ffmpeg_location": ffmpeg_exe(),
        "restrictfilenames": True,
    }
    out, rejects = [], []
    for url in urls:
        # The URL's tag in the name: file:///a/x.wav and file:///b/x.wav share extractor and id,
        # and yt-dlp would take the second for "already downloaded".
        with yt_dlp.YoutubeDL({**opts, "outtmpl": str(audio_dir / f"%(extractor)s-%(id)s-{tag(url)}.%(ext)s")}) as ydl:
            try:
                info = ydl.extract_info(url, download=True)
            except Exception as e:  # noqa: BLE001 - yt-dlp raises many kinds; each is this URL's reject
                reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).replace("ERROR: ", "")
                rejects.append({"audio": url, "source": url, "error": "FetchFailed", "reason": reason})
                continue
            for entry in info.get("entries") or [info]:
                if not entry:
                    continue
                path = entry.get("requested_downloads", [{}])[0].get("filepath") or ydl.prepare_filename(entry)
                out.append(Candidate(path, url, "", id=f"{entry.get('extractor', 'url')}-{entry.get('id')}",
                                     extra={"title": entry.get("title")} if entry.get("title") else {}))
    return out, rejects


def collect(sources: list[str], out_dir: Path, transcripts: str | None = None, enable_file_urls: bool = False) -> tuple[list[Candidate], list[dict]]:
    """Every source -> candidates (plus rejects of whole URLs that could not be fetched)."""
    table = _read_transcripts_csv(Path(transcripts)) if transcripts else None
    audio_dir = out_dir / "audio"
    candidates, rejects, urls = [], [], []
    for src in sources:
        path = Path(src)
        if URL_RE.match(src):
            urls.append(src)
        elif src.startswith("hf:") or path.suffix in (".parquet", ".arrow"):
            if not src.startswith("hf:") and not path.is_file():
                raise IngestError(f"{src}: no such dataset file")
            candidates += from_dataset(src, audio_dir)
        elif path.is_dir():
            candidates += from_folder(path, table)
        elif not path.exists():
            raise IngestError(f"{src}: no such file or folder (nor a URL)")
        elif path.suffix == ".jsonl":
            candidates += from_manifest(path)
        elif path.suffix == ".csv":
            candidates += from_csv(path)
        elif path.suffix == ".txt":
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
            bad = [ln for ln in lines if not URL_RE.match(ln)]
            if bad:
                raise IngestError(f"{src}: a .txt source lists URLs or search queries, one a line; line {lines.index(bad[0]) + 1} is {bad[0]!r}")
            urls += lines
        else:
            candidates.append(Candidate(os.path.abspath(path), src, _sidecar_text(path) or ""))
    if urls:
        fetched, failed = from_urls(urls, audio_dir, enable_file_urls)
        candidates += fetched
        rejects += failed
    assign_ids(candidates)
    return candidates, rejects


# -- checking ------------------------------------------------------------------------------------
def _convert_to_flac(path: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp.{os.getpid()}.flac")
    r = subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(path), "-vn", "-c:a", "flac", str(tmp)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise AudioError(path, f"ffmpeg could not decode it: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'unknown error'}")
    os.replace(tmp, target)
    return target


def check_clip(c: Candidate, audio_dir: Path, min_seconds: float, max_seconds: float | None, silence_dbfs: float) -> Utterance:
    """The candidate as a manifest row, or an AudioError saying why it cannot be used."""
    path = Path(c.audio)
    wave = load_audio(path, CHECK_RATE, max_seconds=max_seconds, min_seconds=min_seconds)
    peak = float(np.abs(wave).max()) if len(wave) else 0.0
    if peak == 0 or 20 * np.log10(peak) < silence_dbfs:
        level = "digital silence" if peak == 0 else f"peak {20 * np.log10(peak):.0f} dBFS"
        raise AudioSilent(path, f"silent ({level}, below {silence_dbfs:g} dBFS)")
    if path.suffix.lower() in FFMPEG_EXTS:
        path = _convert_to_flac(path, audio_dir / f"{safe_name(path.stem)}-{path_tag(path)}.flac")  # one per source file
    extra = {k: v for k, v in c.extra.items() if k in ("prompt", "response")}
    return Utterance(audio=str(path.resolve()), text=c.text, id=c.id, speaker=c.speaker, duration=round(len(wave) / CHECK_RATE, 4), **extra)


def ingest(
    sources: list[str],
    out_dir: str | Path,
    *,
    transcripts: str | None = None,
    min_seconds: float = 0.1,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    silence_dbfs: float = -60.0,
    enable_file_urls: bool = False,
    progress: bool = True,
) -> dict:
    """Run the whole ingest (see the module docstring) and return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    candidates, rejects = collect(sources, out_dir, transcripts, enable_file_urls)
    kept = []
    for c in tqdm(candidates, desc="checking audio", unit="clip", disable=not progress):
        try:
            kept.append(check_clip(c, out_dir / "audio", min_seconds, max_seconds, silence_dbfs))
        except AudioError as e:
            rejects.append({"audio": c.audio, "source": c.source, "id": c.id, "error": type(e).__name__, "reason": e.reason})
    write_manifest(kept, out_dir / "manifest.jsonl")
    atomic.write_jsonl(out_dir / "rejects.jsonl", rejects)
    n_in = len(candidates) + sum(1 for r in rejects if r["error"] == "FetchFailed")
    summary = {"in": n_in, "out": len(kept), "rejected": len(rejects), "hours": round(sum(u.duration for u in kept) / 3600, 4),
               "sources": sources, "seconds": round(time.perf_counter() - start, 2)}
    atomic.write_json(out_dir / "summary.json", summary)
    return summary
