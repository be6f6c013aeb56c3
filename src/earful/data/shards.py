"""Pre-encoded training data: a frozen encoder's outputs (or an audio tokenizer's ids) per clip,
in a content-addressed store that a rerun resumes and `torchrun` splits with no overlap and no gap.

    earful data encode --encoder bundled:whisper-tiny.en --data M.jsonl --out DIR
    torchrun --nproc_per_node 4 -m earful data encode ...      # same result, four processes

Layout of DIR:
    objects/ab/abcdef....safetensors   one clip: `hidden` (T', C) float32, or `ids` (N,) int64
    index.jsonl                        manifest order: id, audio, key, frames, duration
    rejects.jsonl                      clips that could not be read, with the reason
    summary.json                       counts (in = encoded + already done + rejected), speed
    parts/                             each rank's rows, merged into index.jsonl by rank 0

An object's key is sha256(encoder identity + sha256 of the audio file's bytes): the same clip
encoded by the same weights is found again whatever its path or manifest, and a different encoder
never collides. Clips are sorted by length and cut into batches once, from the whole manifest; batch
i goes to rank i % world_size, so every run, resumed or split, encodes the same batches and writes
the same objects (equal to float rounding: MKL may round a product differently from one process to
the next). Objects are written to a temporary name and renamed; a batch is skipped only when every
one of its objects exists and reads back whole. An object that does not (cut short by a full disk,
a copy that stopped, a crash before the data reached the disk) is logged, removed and encoded again,
and the trainer's reader takes it as missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import atomic
from ..audio import DEFAULT_MAX_SECONDS, AudioError, audio_duration, load_audio
from .manifest import Utterance, read_manifest

logger = logging.getLogger(__name__)

MIN_SECONDS = 0.05


# -- what encodes -------------------------------------------------------------------------------
class FrozenEncoder:
    """A listening LM's audio encoder, from an encoder spec or a trained earful model folder."""

    kind = "hidden"

    def __init__(self, spec: str, device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoFeatureExtractor

        from ..models.encoders import build_audio_encoder, load_encoder_weights
        from ..pretrained import resolve

        folder = resolve(spec)
        config = AutoConfig.from_pretrained(folder)
        if config.model_type == "earful_speechlm":  # a trained earful model: its own (maybe fine-tuned) encoder
            from ..models.build import load_speech_lm

            model, processor = load_speech_lm(folder)
            self.encoder, self.config, self.feature_extractor = model.audio_tower, model.config.encoder_config, processor.feature_extractor
        else:
            self.config = config
            self.encoder = build_audio_encoder(config)
            load_encoder_weights(self.encoder, folder)
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(folder)
        self.encoder.to(device).eval()
        self.device, self.spec = torch.device(device), spec
        self.identity = encoder_identity(self.encoder, self.config)

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    @torch.no_grad()
    def __call__(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        from ..models.processing import featurize

        feats = featurize(self.feature_extractor, self.config, waves)
        out, mask = self.encoder(feats["input_features"].to(self.device), feats["input_features_mask"].to(self.device))
        hidden = out.last_hidden_state
        return [hidden[j, : int(mask[j].sum())].to("cpu", torch.float32).contiguous() for j in range(len(waves))]


class TokenizerEncoder:
    """An audio tokenizer (units or codec, earful.tokenizers) giving token ids per clip."""

    kind = "ids"

    def __init__(self, folder: str):
        from ..tokenizers.base import load_audio_tokenizer

        self.tokenizer = load_audio_tokenizer(folder)
        self.spec = folder
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for p in files:
            digest.update(p.relative_to(folder).as_posix().encode())
            digest.update(_file_sha256(p).encode())
        self.identity = digest.hexdigest()

    @property
    def sampling_rate(self) -> int:
        return self.tokenizer.sampling_rate

    def __call__(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        return [torch.tensor(ids, dtype=torch.int64) for ids in self.tokenizer.encode_batch(waves)]


def load_encoder(spec: str, device: str | torch.device = "cpu"):
    """A tokenizer folder (holding an earful tokenizer config) or an encoder / model spec."""
    folder = Path(spec)
    if folder.is_dir() and not (folder / "preprocessor_config.json").exists() and any(folder.glob("*.json")):
        try:
            return TokenizerEncoder(spec)
        except Exception as e:  # noqa: BLE001 - not a tokenizer folder: try it as an encoder
            logger.debug("%s is not an audio tokenizer folder (%s)", spec, e)
    return FrozenEncoder(spec, device)


def encoder_identity(encoder: torch.nn.Module, config) -> str:
    """What makes two encoders give the same outputs: the architecture and every weight.

    The architecture is the model type (weight shapes fix the sizes), so a listening LM's frozen
    encoder and the pretrained encoder it came from share an identity, and a store serves both.
    """
    return _identity(config.model_type, encoder.state_dict())


def find_objects(root: str | Path, identity: str, audio_paths: list[str]) -> dict[int, torch.Tensor]:
    """{position: stored encoding} for the clips of `audio_paths` this encoder has in the store."""
    root = Path(root)
    if not (root / "objects").is_dir():
        raise FileNotFoundError(f"{root}: not an encoded store (no objects/; fill it with `earful data encode`)")
    found = {}
    for i, path in enumerate(audio_paths):
        try:
            obj = object_path(root, object_key(identity, path))
        except OSError:  # the clip itself is unreadable: the trainer's own read of it says why
            continue
        if obj.is_file():
            tensor = _read_object(obj)
            if tensor is not None:
                found[i] = tensor
    return found


def _read_object(path: Path) -> torch.Tensor | None:
    """A stored object's tensor, or None (logged) when the file is cut short or damaged."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(next(iter(f.keys())))
    except (SafetensorError, OSError, StopIteration) as e:
        logger.warning("%s: unreadable encoded object (%s); taking it as not encoded", path, e)
        return None


def _identity(architecture: str, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(architecture.encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def object_key(identity: str, audio_path: str | Path) -> str:
    return hashlib.sha256(f"{identity}:{_file_sha256(Path(audio_path))}".encode()).hexdigest()


def object_path(root: Path, key: str) -> Path:
    return root / "objects" / key[:2] / f"{key}.safetensors"


def load_object(root: str | Path, key: str) -> torch.Tensor:
    """One clip's stored encoding: `hidden` (T', C) or `ids` (N,)."""
    with safe_open(object_path(Path(root), key), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys())))


def read_index(root: str | Path) -> list[dict]:
    path = Path(root) / "index.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no index.jsonl (run `earful data encode` into it first)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the job -------------------------------------------------------------------------------------
@dataclass
class _Item:
    pos: int  # position in the manifest
    utt: Utterance
    seconds: float


def plan_batches(items: list[_Item], batch_size: int) -> list[list[_Item]]:
    """Longest first, cut into batches: the same batches whatever the world size."""
    ordered = sorted(items, key=lambda it: (-it.seconds, it.pos))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def _write_object(root: Path, key: str, kind: str, tensor: torch.Tensor, meta: dict) -> None:
    path = object_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    # One metadata entry: safetensors writes a map's keys in no fixed order, and objects must be bit-identical.
    save_file({kind: tensor}, str(tmp), metadata={"earful": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


def _object_frames(path: Path) -> int | None:
    """The object's length in frames (ids), or None when it is missing or does not read back whole
    (then it is removed: a clip that is now a reject leaves no broken object behind).

    safetensors checks at open that the header is complete and that the data covers every tensor
    the header lists, so a file cut short anywhere fails here.
    """
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            return int(f.get_slice(next(iter(f.keys()))).get_shape()[0])
    except (SafetensorError, OSError, StopIteration) as e:
        logger.warning("%s: unreadable encoded object (%s); removed, to be encoded again", path, e)
        path.unlink(missing_ok=True)
        return None


def _sweep_temporaries(root: Path) -> int:
    """Half-written files a killed run left behind (never renamed into place)."""
    n = 0
    for tmp in (root / "objects").rglob(".*.tmp.*") if (root / "objects").is_dir() else []:
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def _dist():
    """(rank, world_size, barrier) under torchrun; (0, 1, no-op) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, lambda: None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier


def encode_manifest(
    data: str | Path,
    out: str | Path,
    encoder_spec: str,
    *,
    batch_size: int = 16,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Encode every clip of a manifest into OUT (see the module docstring); returns the summary."""
    rank, world, barrier = _dist()
    root = Path(out)
    device = device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        swept = _sweep_temporaries(root)
        if swept:
            logger.info("removed %d half-written files of an interrupted run", swept)
    barrier()
    utts = read_manifest(data)
    encoder = load_encoder(encoder_spec, device)
    start = time.perf_counter()

    # Lengths for planning come from headers (cheap); an unreadable header is a reject right away.
    items, rejects = [], []
    for pos, u in enumerate(utts):
        try:
            seconds = u.duration if u.duration is not None else audio_duration(u.audio)
            items.append(_Item(pos, u, seconds))
        except AudioError as e:
            rejects.append({"pos": pos, "id": u.id, "audio": u.audio, "error": type(e).__name__, "reason": e.reason})
    rejects = [r for r in rejects if r["pos"] % world == rank]  # each rank reports a share of these
    batches = [b for i, b in enumerate(plan_batches(items, batch_size)) if i % world == rank]
    rows, done_before, encoded, encoded_seconds = [], 0, 0, 0.0
    total_seconds = sum(it.seconds for b in batches for it in b)
    bar = tqdm(total=total_seconds, desc=f"encoding (rank {rank}/{world})" if world > 1 else "encoding", disable=not progress,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}{postfix}]")
    for batch in batches:
        keys = [object_key(encoder.identity, it.utt.audio) for it in batch]
        frames = [_object_frames(object_path(root, k)) for k in keys]
        if all(n is not None for n in frames):
            rows += [_row(it, k, n) for it, k, n in zip(batch, keys, frames)]
            done_before += len(batch)
            bar.update(sum(it.seconds for it in batch))
            continue
        waves, kept = [], []
        for it, k in zip(batch, keys):
            try:
                wave = load_audio(it.utt.audio, encoder.sampling_rate, max_seconds=max_seconds, min_seconds=MIN_SECONDS)
                if encoder.kind == "hidden":  # a clip the encoder cannot take whole is a reject, never cut to fit
                    from ..models.processing import check_audio_length

                    check_audio_length(encoder.feature_extractor, encoder.config, len(wave), it.utt.audio)
                waves.append(wave)
                kept.append((it, k))
            except AudioError as e:
                rejects.append({"pos": it.pos, "id": it.utt.id, "audio": it.utt.audio, "error": type(e).__name__, "reason": e.reason})
        if waves:
            for (it, k), tensor in zip(kept, encoder(waves)):
                _write_object(root, k, encoder.kind, tensor, {"encoder": encoder.spec, "audio": Path(it.utt.audio).name})
                rows.append(_row(it, k, tensor.shape[0]))
                encoded += 1
                encoded_seconds += it.seconds
        bar.update(sum(it.seconds for it in batch))
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{encoded_seconds / max(elapsed, 1e-9):.0f} audio-h/h")
    bar.close()
    part = {"rank": rank, "rows": rows, "rejects": rejects, "encoded": encoded, "encoded_seconds": encoded_seconds, "done_before": done_before,
            "seconds": time.perf_counter() - start}
    atomic.write_json(root / "parts" / f"rank-{rank:05d}-of-{world:05d}.json", part, indent=None)
    barrier()
    summary = None
    if rank == 0:
        summary = _merge(root, world, len(utts), encoder)
    barrier()
    if summary is None:
        summary = json.loads((root / "summary.json").read_text())
    return summary


def _row(it: _Item, key: str, frames: int) -> dict:
    return {"pos": it.pos, "id": it.utt.id, "audio": it.utt.audio, "key": key, "frames": int(frames), "duration": round(it.seconds, 4)}


def _merge(root: Path, world: int, n_in: int, encoder) -> dict:
    parts = [json.loads((root / "parts" / f"rank-{r:05d}-of-{world:05d}.json").read_text()) for r in range(world)]
    rows = sorted((row for p in parts for row in p["rows"]), key=lambda r: r["pos"])
    rejects = sorted((rej for p in parts for rej in p["rejects"]), key=lambda r: r["pos"])
    positions = [r["pos"] for r in rows] + [r["pos"] for r in rejects]
    if sorted(positions) != list(range(n_in)):  # no overlap, no gap
        raise RuntimeError(f"ranks covered {len(positions)} clips ({len(set(positions))} distinct) of {n_in}")
    atomic.write_jsonl(root / "index.jsonl", ({k: v for k, v in r.items() if k != "pos"} for r in rows))
    atomic.write_jsonl(root / "rejects.jsonl", ({k: v for k, v in r.items() if k != "pos"} for r in rejects))
    seconds = max(p["seconds"] for p in parts)
    audio_seconds = sum(r["duration"] for r in rows)
    encoded_seconds = sum(p["encoded_seconds"] for p in parts)
    summary = {
        "in": n_in, "out": len(rows), "rejected": len(rejects),
        "encoded": sum(p["encoded"] for p in parts), "already_done": sum(p["done_before"] for p in parts),
        "world_size": world, "encoder": encoder.spec, "encoder_identity": encoder.identity, "kind": encoder.kind,
        "audio_hours": round(audio_seconds / 3600, 4), "seconds": round(seconds, 2),
        "encoded_audio_hours_per_hour": round(encoded_seconds / seconds, 1) if seconds > 0 else None,
    }
    atomic.write_json(root / "summary.json", summary)
    return summary
