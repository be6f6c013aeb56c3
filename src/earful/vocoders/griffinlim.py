"""`griffin-lim`: a units -> log-mel adapter and Griffin-Lim phase recovery. No pretrained weights.

The fallback that always works: the adapter is trained on any audio (its units and its log-mel),
and Griffin-Lim (with the "fast" momentum of Perraudin et al. 2013, as torchaudio) turns the
predicted mel back into a waveform through the filterbank's pseudo-inverse. It sounds phasey and
buzzy, but words come through (issue 16: Whisper WER 0.15 from k=500 units on Piper sentences).

    units (n,) at 50 Hz -> adapter -> log-mel (n_mels, 2n) at 100 Hz -> |STFT| (n_fft/2+1, 2n) -> wave (n * 320,) at 16 kHz
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .adapter import AdapterConfig, AdapterVocoder, Pair, UnitAdapter, train_adapter
from .base import VocoderError, mean_durations

logger = logging.getLogger(__name__)


@dataclass
class MelConfig:
    sampling_rate: int = 16000  # the rate unit tokenizers read, so fitting needs no second resampling
    n_fft: int = 1024
    win_length: int = 1024  # 64 ms: Griffin-Lim recovers phase better from a long, heavily overlapped window
    hop_length: int = 160  # 10 ms: 100 mel frames a second, two per 50 Hz unit
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8000.0
    iterations: int = 32  # Griffin-Lim iterations: 32 is where torchaudio's default stops too

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / self.hop_length


class LogMel:
    """log(max(mel magnitude, 1e-5)) of a wave, and the way back by Griffin-Lim."""

    def __init__(self, config: MelConfig | None = None):
        from transformers.audio_utils import mel_filter_bank

        self.config = c = config or MelConfig()
        fb = mel_filter_bank(c.n_fft // 2 + 1, c.n_mels, c.f_min, c.f_max, c.sampling_rate, norm="slaney", mel_scale="slaney")
        self.filters = torch.from_numpy(fb.T.astype(np.float32))  # (n_mels, F)
        self.inverse = torch.linalg.pinv(self.filters)  # (F, n_mels)
        self.window = torch.hann_window(c.win_length)

    def _stft(self, wave: torch.Tensor) -> torch.Tensor:
        c = self.config
        return torch.stft(wave, c.n_fft, c.hop_length, c.win_length, self.window, return_complex=True)  # (F, T)

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        """(N,) float32 at `sampling_rate` -> (n_mels, N // hop + 1) float32."""
        mag = self._stft(torch.from_numpy(np.asarray(wave, dtype=np.float32))).abs()  # (F, T)
        return (self.filters @ mag).clamp(min=1e-5).log().numpy()  # (n_mels, T)

    def invert(self, log_mel: torch.Tensor, length: int, seed: int = 0) -> np.ndarray:
        """(n_mels, T) log-mel -> (length,) wave by Griffin-Lim; `seed` fixes the initial phase."""
        c = self.config
        mag = (self.inverse @ log_mel.exp()).clamp(min=0)  # (F, T)
        gen = torch.Generator().manual_seed(seed)
        angles = torch.polar(torch.ones_like(mag), torch.rand(mag.shape, generator=gen) * 2 * torch.pi)  # (F, T)
        momentum = 0.99
        previous = torch.zeros_like(angles)
        for _ in range(c.iterations):
            wave = torch.istft(mag * angles, c.n_fft, c.hop_length, c.win_length, self.window, length=length)
            rebuilt = self._stft(wave)[:, : mag.shape[1]]  # (F, T): a wave of T * hop samples has T + 1 frames
            angles = rebuilt - previous * (momentum / (1 + momentum))
            angles = angles / angles.abs().clamp(min=1e-16)
            previous = rebuilt
        return torch.istft(mag * angles, c.n_fft, c.hop_length, c.win_length, self.window, length=length).numpy()


class GriffinLimVocoder(AdapterVocoder):
    """Units -> adapter -> log-mel -> Griffin-Lim -> 16 kHz audio."""

    kind = "griffin-lim"

    def __init__(self, adapter: UnitAdapter, durations: np.ndarray, units_folder=None, fit_info=None,
                 mel: MelConfig | None = None):
        super().__init__(adapter, durations, units_folder, fit_info)
        self.mel = LogMel(mel)

    @property
    def sampling_rate(self) -> int:
        return self.mel.config.sampling_rate

    def render(self, frames: torch.Tensor) -> np.ndarray:
        return self.mel.invert(frames, frames.shape[1] * self.mel.config.hop_length)  # (T * hop,)

    def backend_config(self) -> dict:
        return {"mel": asdict(self.mel.config)}

    @classmethod
    def from_pretrained(cls, folder) -> GriffinLimVocoder:
        config, adapter, durations, units = cls._load_parts(folder)
        try:
            mel = MelConfig(**config.get("mel", {}))
        except TypeError as e:
            raise VocoderError(f"{folder}: vocoder_config.json's mel settings are not understood ({e})") from None
        return cls(adapter, durations, units, config.get("fit"), mel)


def mel_pairs(waves: list[np.ndarray], tokenizer, mel: LogMel) -> list[Pair]:
    """(units, log-mel) of each wave (float32 at the tokenizer's rate, which must be the mel's)."""
    if tokenizer.sampling_rate != mel.config.sampling_rate:
        raise VocoderError(f"the unit tokenizer reads {tokenizer.sampling_rate} Hz audio but the mel is at "
                           f"{mel.config.sampling_rate} Hz; set MelConfig(sampling_rate={tokenizer.sampling_rate})")
    pairs = []
    for wave, units in zip(waves, tokenizer.encode_batch(waves, dedup=False)):
        pairs.append(Pair(np.asarray(units, dtype=np.int64), mel(wave), wave))
    return pairs


def fit_griffin_lim(tokenizer, waves: list[np.ndarray], steps: int = 2000, *, seed: int = 0,
                    units_folder: str | Path | None = None, batch: int = 16, lr: float = 1e-3,
                    adapter: dict | None = None, mel: MelConfig | None = None) -> tuple[GriffinLimVocoder, dict]:
    """Train a `griffin-lim` vocoder for `tokenizer`'s units on `waves` (float32 at the tokenizer's rate).

    Returns the vocoder and a report (losses, clips, seconds of audio). `units_folder` is where
    `tokenizer` is saved, so the vocoder's folder can keep a copy of it.
    """
    log_mel = LogMel(mel or MelConfig(sampling_rate=tokenizer.sampling_rate))
    pairs = mel_pairs(waves, tokenizer, log_mel)
    config = AdapterConfig(vocab_size=tokenizer.vocab_size, out_dim=log_mel.config.n_mels,
                           in_rate=float(tokenizer.frame_rate), out_rate=log_mel.config.frame_rate, **(adapter or {}))
    torch.manual_seed(seed)
    net = UnitAdapter(config)
    losses = train_adapter(net, pairs, steps, lr=lr, batch=batch, seed=seed, desc="adapter (log-mel L1)")
    vocoder = GriffinLimVocoder(net, mean_durations([p.units.tolist() for p in pairs], config.vocab_size), units_folder,
                                mel=log_mel.config)
    report = {"kind": GriffinLimVocoder.kind, "clips": len(pairs), "steps": steps,
              "seconds": round(sum(len(p.wave) for p in pairs) / log_mel.config.sampling_rate, 1),
              "loss_first": losses[0] if losses else None, "loss": float(np.mean(losses[-20:])) if losses else None}
    vocoder.fit_info = report
    return vocoder, report
