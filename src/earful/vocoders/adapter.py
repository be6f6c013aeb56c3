"""The trainable part every earful vocoder shares: units -> acoustic frames, plus its training loop.

A vocoder here is a small adapter in front of a fixed back end: the adapter maps unit ids at the
unit rate to frames of whatever the back end reads (Piper's latent z at 86.13 Hz, or a log-mel at
100 Hz for Griffin-Lim), and the back end turns those frames into a waveform.

Symbols: B batch, n units (at `in_rate` Hz), C adapter channels, T output frames (at `out_rate`
Hz, T = round(n * out_rate / in_rate)), D output features.

    units (B, n) -> embed (B, C, n) -> blocks -> interpolate (B, C, T) -> post blocks -> proj (B, D, T)

`AdapterVocoder` holds what save / load / decode have in common: the adapter's weights
(adapter.safetensors), mean unit durations, and a copy of the unit tokenizer (units/).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .base import DURATIONS_FILE, UNITS_DIR, Vocoder, VocoderError, check_units, expand_durations, read_config

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter.safetensors"


@dataclass
class AdapterConfig:
    vocab_size: int  # k of the unit tokenizer
    out_dim: int  # D: features per output frame (192 for Piper's z, n_mels for a mel)
    in_rate: float  # units per second (50 for Whisper units)
    out_rate: float  # output frames per second
    channels: int = 256  # C; 256 learnt audible Piper z in ~9 min on 2 cores (issue 16)
    blocks: int = 3  # residual blocks at the unit rate: context of ~3 * 4 units each side
    post_blocks: int = 2  # residual blocks after interpolation: smooth the upsampled frames
    kernel: int = 5

    def output_length(self, n: int) -> int:
        return max(1, round(n * self.out_rate / self.in_rate))


class ResBlock(nn.Module):
    """x + conv(act(conv(act(x)))): shape-preserving (B, C, L)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(channels, channels, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, 0.1)), 0.1))


class UnitAdapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.embed = nn.Embedding(config.vocab_size, c)
        self.blocks = nn.Sequential(*[ResBlock(c, config.kernel) for _ in range(config.blocks)])
        self.post_blocks = nn.Sequential(*[ResBlock(c, config.kernel) for _ in range(config.post_blocks)])
        self.proj = nn.Conv1d(c, config.out_dim, 1)

    def forward(self, units: torch.Tensor, out_len: int | None = None) -> torch.Tensor:
        """(B, n) int64 unit ids -> (B, D, T) frames; T = out_len or `config.output_length(n)`."""
        out_len = out_len or self.config.output_length(units.shape[1])
        x = self.embed(units).transpose(1, 2)  # (B, C, n)
        x = self.blocks(x)  # (B, C, n)
        x = F.interpolate(x, size=out_len, mode="linear", align_corners=False)  # (B, C, T): frame centres aligned
        x = self.post_blocks(x)  # (B, C, T)
        return self.proj(F.leaky_relu(x, 0.1))  # (B, D, T)


# -- training -------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One training clip: its non-deduplicated units (n,) and target frames (D, T) of the same audio."""

    units: np.ndarray
    target: np.ndarray
    wave: np.ndarray | None = None  # the audio at the back end's rate, for a loss through it


def _crops(pairs: list[Pair], config: AdapterConfig, rng: np.random.Generator, batch: int, crop: int):
    """A batch of random crops of at most `crop` units, padded: units (B, n), targets (B, D, T), mask (B, T)."""
    picks = rng.integers(0, len(pairs), size=batch)
    items = []
    for i in picks:
        p = pairs[i]
        n = len(p.units)
        start = int(rng.integers(0, n - crop + 1)) if n > crop else 0
        u = p.units[start : start + crop]
        t0 = round(start * config.out_rate / config.in_rate)
        t = p.target[:, t0 : t0 + config.output_length(len(u))]
        items.append((u, t))
    n_max = max(len(u) for u, _ in items)
    t_max = config.output_length(n_max)
    units = np.zeros((batch, n_max), dtype=np.int64)
    targets = np.zeros((batch, config.out_dim, t_max), dtype=np.float32)
    mask = np.zeros((batch, t_max), dtype=np.float32)
    for b, (u, t) in enumerate(items):
        units[b, : len(u)] = u
        targets[b, :, : t.shape[1]] = t
        mask[b, : min(t.shape[1], config.output_length(len(u)))] = 1
    return torch.from_numpy(units), torch.from_numpy(targets), torch.from_numpy(mask)


def train_adapter(adapter: UnitAdapter, pairs: list[Pair], steps: int, *, lr: float = 1e-3, batch: int = 16,
                  crop: int = 100, seed: int = 0, desc: str = "adapter") -> list[float]:
    """Fit `adapter` to map each pair's units to its target frames (masked L1); the loss of every step.

    AdamW with a cosine decay to a tenth of `lr`; random crops of `crop` units (2 s at 50 Hz).
    """
    if not pairs:
        raise VocoderError("no training clips: the data gave no audio with units to fit on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with torch.no_grad():  # start at the mean frame: log-mels sit near -7, and the first steps need not walk there
        adapter.proj.bias.copy_(torch.from_numpy(np.concatenate([p.target for p in pairs], axis=1).mean(1)))
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    adapter.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _ in bar:
        units, targets, mask = _crops(pairs, adapter.config, rng, batch, crop)
        pred = adapter(units, targets.shape[2])  # (B, D, T)
        loss = ((pred - targets).abs().mean(1) * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    adapter.eval()
    return losses


# -- the vocoder around an adapter -----------------------------------------------------------------
class AdapterVocoder(Vocoder):
    """An adapter (units -> frames) in front of a back end (`render`: frames -> wave), saved as a folder."""

    def __init__(self, adapter: UnitAdapter, durations: np.ndarray, units_folder: str | Path | None = None,
                 fit_info: dict | None = None):
        self.adapter = adapter.eval().requires_grad_(False)
        self.durations = np.asarray(durations, dtype=np.float32)  # (vocab_size,) mean run length in frames
        self.units_folder = None if units_folder is None else Path(units_folder)  # unit tokenizer folder, if known
        self.fit_info = dict(fit_info or {})  # what fitting recorded: steps, loss, clips

    @property
    def vocab_size(self) -> int:
        return self.adapter.config.vocab_size

    @property
    def frame_rate(self) -> float:
        return self.adapter.config.in_rate

    def frames(self, units, deduplicated: bool = False) -> torch.Tensor:
        """The adapter's output for one sequence: (D, T)."""
        ids = check_units(units, self.vocab_size)
        if deduplicated:
            ids = expand_durations(ids, self.durations)
        with torch.no_grad():
            return self.adapter(torch.from_numpy(ids)[None])[0]  # (D, T)

    def render(self, frames: torch.Tensor) -> np.ndarray:
        """The back end: (D, T) frames -> float32 wave (T * samples per frame,)."""
        raise NotImplementedError

    def decode(self, units, deduplicated: bool = False) -> np.ndarray:
        return np.clip(self.render(self.frames(units, deduplicated)), -1.0, 1.0).astype(np.float32)

    def unit_tokenizer(self):
        """The unit tokenizer this vocoder was fitted with (saved in its folder as units/)."""
        from ..tokenizers import load_audio_tokenizer

        if self.units_folder is None:
            raise VocoderError("this vocoder knows no unit tokenizer (it was built in memory without one); "
                               "pass the tokenizer folder the units come from")
        return load_audio_tokenizer(self.units_folder)

    def backend_config(self) -> dict:
        return {}

    def config(self) -> dict:
        return {"adapter": asdict(self.adapter.config), **self.backend_config(), "fit": self.fit_info}

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save

        from ..atomic import write_bytes
        from ..tokenizers.base import atomic_save_npy

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.adapter.state_dict().items()}
        write_bytes(folder / WEIGHTS_FILE, save(state))
        atomic_save_npy(folder / DURATIONS_FILE, self.durations)
        if self.units_folder is not None and self.units_folder.resolve() != (folder / UNITS_DIR).resolve():
            # Saved through the tokenizer, not copied: a fit folder also holds its feature cache.
            from ..tokenizers import load_audio_tokenizer

            load_audio_tokenizer(self.units_folder).save_pretrained(folder / UNITS_DIR)
            self.units_folder = folder / UNITS_DIR
        self._write_config(folder)  # the config last: a folder with it is complete

    @classmethod
    def _load_parts(cls, folder: str | Path) -> tuple[dict, UnitAdapter, np.ndarray, Path | None]:
        from safetensors.torch import load_file

        folder = Path(folder)
        config = read_config(folder)
        for name in (WEIGHTS_FILE, DURATIONS_FILE):
            if not (folder / name).is_file():
                raise VocoderError(f"{folder}: vocoder folder without {name}; refit it with `earful vocoder fit`")
        try:
            adapter = UnitAdapter(AdapterConfig(**config["adapter"]))
            adapter.load_state_dict(load_file(folder / WEIGHTS_FILE))
        except (KeyError, TypeError, RuntimeError) as e:
            raise VocoderError(f"{folder}: {WEIGHTS_FILE} does not match vocoder_config.json's adapter ({e}); refit it") from None
        durations = np.load(folder / DURATIONS_FILE)
        units = folder / UNITS_DIR if (folder / UNITS_DIR).is_dir() else None
        return config, adapter, durations, units
