"""Speech units: features from one layer of a speech encoder, assigned to k-means centroids.

The GSLM / Slam recipe: run a frozen encoder (Whisper, HuBERT, wav2vec2: anything
`earful.models.encoders` loads), take the hidden states of layer L, fit k-means (faiss) over the
frames of a corpus, and tokenise a clip as the nearest centroid of each frame, with runs of the
same unit collapsed to one when `dedup` is on.

Feature extraction is the expensive, frozen stage, so it is kept apart from clustering (SlamKit's
lesson): `extract_features` caches a corpus's frames on disk, and one extraction serves every k.

Shapes: a clip of T samples -> F feature frames (B, F, T_mel) -> encoder frames (T', C) at
`frame_rate` Hz (50 for Whisper, 50 for HuBERT/wav2vec2 base) -> T' unit ids (fewer after dedup).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .base import AudioTokenizer, AudioTokenizerError, atomic_save_npy, atomic_write_text, deduplicate, read_config

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "bundled:whisper-tiny.en"
CENTROIDS_FILE = "centroids.npy"


def _require_faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs each SIMD build it tries, at INFO
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"unit tokenizers need faiss ({e}); install it with: pip install faiss-cpu==1.15.1") from e
    return faiss


def encoder_depth(config) -> int:
    return config.encoder_layers if config.model_type == "whisper" else config.num_hidden_layers


def default_layer(config) -> int:
    """The layer whose features are clustered when none is asked for.

    Whisper: the last. Its encoder was trained only to feed an ASR decoder, so its top layer is the
    most phonetic one (and tiny.en has only 4). HuBERT / wav2vec2: the middle (layer 6 of base),
    where GSLM and textlesslib found the best units; their top layers specialise in the
    pre-training target instead.
    """
    n = encoder_depth(config)
    return n if config.model_type == "whisper" else max(1, n // 2)


class LayerFeatures:
    """A frozen speech encoder cut at layer `layer`: waveforms -> per-frame features (T', C)."""

    def __init__(self, spec: str = DEFAULT_ENCODER, layer: int | None = None, device: str = "cpu"):
        from transformers import AutoConfig, AutoFeatureExtractor

        from ..models.encoders import build_audio_encoder, load_encoder_weights
        from ..pretrained import resolve

        folder = resolve(spec)
        config = AutoConfig.from_pretrained(folder)
        depth = encoder_depth(config)
        layer = default_layer(config) if layer is None else layer
        if not 1 <= layer <= depth:
            raise AudioTokenizerError(f"{spec}: layer {layer} does not exist; the encoder has layers 1..{depth}")
        self.spec, self.layer, self.config, self.device = spec, layer, config, torch.device(device)
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(folder)
        self.encoder = build_audio_encoder(config)
        load_encoder_weights(self.encoder, folder)
        if config.model_type == "whisper":
            # Layers above L are never needed: drop them rather than compute and discard them.
            del self.encoder.layers[layer:]
            if layer < depth:
                self.encoder.layer_norm = nn.Identity()  # Whisper's final norm belongs to the last layer's output
        self.encoder.to(self.device).eval().requires_grad_(False)

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    @property
    def frame_rate(self) -> float:
        if self.config.model_type == "whisper":
            return self.sampling_rate / self.feature_extractor.hop_length / 2  # conv2 stride 2: 50 Hz
        return self.sampling_rate / float(np.prod(self.config.conv_stride))

    def _input(self, wave: np.ndarray) -> np.ndarray:
        from ..models.processing import clip_features

        return clip_features(self.feature_extractor, self.config, wave)  # (F, T), no 30 s padding, or (T,); never cut

    @torch.no_grad()
    def __call__(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Features of each waveform (float32 mono at `sampling_rate`): a list of (T'_i, C) arrays."""
        inputs = [self._input(w) for w in waves]
        lengths = [x.shape[-1] for x in inputs]
        batch = np.zeros((len(inputs), *inputs[0].shape[:-1], max(lengths)), dtype=np.float32)
        mask = np.zeros((len(inputs), max(lengths)), dtype=np.int64)
        for i, (x, n) in enumerate(zip(inputs, lengths)):
            batch[i, ..., :n] = x
            mask[i, :n] = 1
        x, m = torch.from_numpy(batch).to(self.device), torch.from_numpy(mask).to(self.device)
        if self.config.model_type == "whisper":
            out, hidden_mask = self.encoder(x, m)
            hidden = out.last_hidden_state  # (B, T', C)
        else:
            out, hidden_mask = self.encoder(x, m, output_hidden_states=True)
            hidden = out.hidden_states[self.layer]  # (B, T', C); hidden_states[0] is the CNN front end
        return [hidden[i, : int(hidden_mask[i].sum())].float().cpu().numpy() for i in range(len(waves))]


# -- fitting -------------------------------------------------------------------------------------
def _cache_key(spec: str, layer: int, paths: list[str]) -> str:
    h = hashlib.sha1(f"{spec}|{layer}".encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def extract_features(
    audio_paths: list[str],
    features: LayerFeatures,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
) -> tuple[np.ndarray, list[int]]:
    """Frames of every clip stacked: (N, C) float32, and each clip's frame count.

    With `cache_dir`, the result is stored there under a key of (encoder, layer, every file's path,
    size and mtime) and read back by the next call with the same key: fitting k=100 and k=500 runs
    the encoder once.
    """
    from ..audio import load_audio

    cache = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = _cache_key(features.spec, features.layer, audio_paths)
        cache = cache_dir / f"features-L{features.layer}-{key}"
        if cache.with_suffix(".npy").is_file() and cache.with_suffix(".json").is_file():
            logger.info("features from cache %s", cache.with_suffix(".npy"))
            lengths = json.loads(cache.with_suffix(".json").read_text())["lengths"]
            return np.load(cache.with_suffix(".npy")), lengths
    start = time.perf_counter()
    order = sorted(range(len(audio_paths)), key=lambda i: Path(audio_paths[i]).stat().st_size)  # similar lengths together
    per_clip: list[np.ndarray | None] = [None] * len(audio_paths)
    for s in tqdm(range(0, len(order), batch_size), desc=f"encoder features (layer {features.layer})", unit="batch", leave=False):
        idx = order[s : s + batch_size]
        waves = [load_audio(audio_paths[i], features.sampling_rate) for i in idx]
        for i, f in zip(idx, features(waves)):
            per_clip[i] = f
    stacked = np.concatenate(per_clip).astype(np.float32)
    lengths = [len(f) for f in per_clip]
    logger.info("extracted %d frames from %d clips in %.1f s", len(stacked), len(lengths), time.perf_counter() - start)
    if cache is not None:
        atomic_save_npy(cache.with_suffix(".npy"), stacked)
        atomic_write_text(cache.with_suffix(".json"), json.dumps({"spec": features.spec, "layer": features.layer,
                                                                 "clips": len(lengths), "lengths": lengths}) + "\n")
    return stacked, lengths


def fit_kmeans(frames: np.ndarray, k: int, seed: int = 0, niter: int = 50) -> np.ndarray:
    """k-means centroids (k, C) over frames (N, C) with faiss; deterministic for a seed."""
    faiss = _require_faiss()
    n, d = frames.shape
    if k < 2:
        raise AudioTokenizerError(f"k must be at least 2, found {k}")
    if n < k:
        raise AudioTokenizerError(f"k={k} centroids need at least {k} frames, the data gives {n}: add audio or lower k")
    if n < 39 * k:
        logger.warning("only %d frames for k=%d (faiss advises at least 39 per centroid): some units will be rare", n, k)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, max_points_per_centroid=max(256, n // k + 1), verbose=False)
    km.train(np.ascontiguousarray(frames, dtype=np.float32))
    return km.centroids.copy()


# -- the tokenizer -------------------------------------------------------------------------------
class UnitTokenizer(AudioTokenizer):
    """Encoder layer features -> nearest k-means centroid per frame (-> runs collapsed if `dedup`)."""

    kind = "units"

    def __init__(self, centroids: np.ndarray, encoder: str = DEFAULT_ENCODER, layer: int | None = None,
                 dedup: bool = True, features: LayerFeatures | None = None):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)  # (k, C)
        self.encoder_spec, self.layer, self.dedup = encoder, layer, dedup
        self._features = features
        self._index = None

    @property
    def features(self) -> LayerFeatures:
        if self._features is None:  # loaded on first use: reading a folder's vocab_size stays cheap
            self._features = LayerFeatures(self.encoder_spec, self.layer)
            self.layer = self._features.layer
        return self._features

    @property
    def vocab_size(self) -> int:
        return len(self.centroids)

    @property
    def frame_rate(self) -> float:
        return self.features.frame_rate

    @property
    def sampling_rate(self) -> int:
        return self.features.sampling_rate

    def units_of(self, frames: np.ndarray) -> np.ndarray:
        """Nearest centroid of each frame: (T', C) -> (T',) int64."""
        if self._index is None:
            faiss = _require_faiss()
            self._index = faiss.IndexFlatL2(self.centroids.shape[1])
            self._index.add(self.centroids)
        if frames.shape[1] != self.centroids.shape[1]:
            raise AudioTokenizerError(f"features have {frames.shape[1]} dimensions but the centroids {self.centroids.shape[1]}: "
                                      "the tokenizer was fitted on another encoder or layer")
        _, idx = self._index.search(np.ascontiguousarray(frames, dtype=np.float32), 1)
        return idx[:, 0].astype(np.int64)

    def encode_batch(self, waves: list[np.ndarray], dedup: bool | None = None) -> list[list[int]]:
        dedup = self.dedup if dedup is None else dedup
        out = []
        for frames in self.features(waves):
            ids = self.units_of(frames).tolist()
            out.append(deduplicate(ids) if dedup else ids)
        return out

    def encode(self, audio: np.ndarray, dedup: bool | None = None) -> list[int]:
        return self.encode_batch([audio], dedup)[0]

    def config(self) -> dict:
        return {"encoder": self.encoder_spec, "layer": self.layer, "k": self.vocab_size, "dedup": self.dedup,
                "dim": int(self.centroids.shape[1])}

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(folder / CENTROIDS_FILE, self.centroids)
        super().save_pretrained(folder)  # the config last: a folder with it is complete

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> UnitTokenizer:
        folder = Path(folder)
        config = read_config(folder)
        path = folder / CENTROIDS_FILE
        if not path.is_file():
            raise AudioTokenizerError(f"{folder}: units tokenizer without {CENTROIDS_FILE}; refit it with `earful units fit`")
        centroids = np.load(path)
        if centroids.ndim != 2 or len(centroids) != config.get("k", len(centroids)):
            raise AudioTokenizerError(f"{path}: expected ({config.get('k')}, C) centroids, found shape {centroids.shape}")
        return cls(centroids, config["encoder"], config.get("layer"), bool(config.get("dedup", True)))


def fit_unit_tokenizers(
    audio_paths: list[str],
    ks: list[int],
    encoder: str = DEFAULT_ENCODER,
    layer: int | None = None,
    dedup: bool = True,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
) -> dict[int, UnitTokenizer]:
    """One tokenizer per k, all from a single pass of the encoder over the clips."""
    features = LayerFeatures(encoder, layer)
    frames, _ = extract_features(audio_paths, features, cache_dir, batch_size)
    out = {}
    for k in ks:
        start = time.perf_counter()
        centroids = fit_kmeans(frames, k, seed)
        logger.info("k-means k=%d over %d frames in %.1f s", k, len(frames), time.perf_counter() - start)
        out[k] = UnitTokenizer(centroids, encoder, features.layer, dedup, features)
    return out
