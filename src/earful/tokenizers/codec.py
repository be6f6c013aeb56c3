"""Neural codec tokens: the first N codebooks of a Mimi-style residual VQ, flattened per frame.

Mimi (Kyutai; `kyutai/mimi` with a model hub, transformers' `MimiModel`) turns 24 kHz audio into
12.5 frames a second, each frame a code from every one of its residual codebooks. A text LLM
sees one token stream, so frame f's codes go in codebook order, each shifted by its codebook's
offset so that the codebooks do not share ids (the Mistral / Moshi-style flattening):

    id(f, q) = q * codebook_size + code[q, f]       q = 0..N-1
    ids      = [id(0,0), id(0,1), .., id(0,N-1), id(1,0), ..]      (len = N * frames)

`vocab_size` is N * codebook_size. Fewer codebooks: shorter sequences, coarser audio; codebook 0
is Mimi's semantic (distilled from WavLM) one. Decoding undoes the offsets and runs Mimi's decoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import AudioTokenizer, AudioTokenizerError, read_config


class CodecTokenizer(AudioTokenizer):
    kind = "codec"
    can_decode = True

    def __init__(self, model, num_codebooks: int | None = None, spec: str | None = None):
        cfg = model.config
        num_codebooks = num_codebooks or cfg.num_quantizers
        if not cfg.num_semantic_quantizers <= num_codebooks <= cfg.num_quantizers:
            raise AudioTokenizerError(f"{spec or 'codec'}: num_codebooks must be in "
                                      f"{cfg.num_semantic_quantizers}..{cfg.num_quantizers}, found {num_codebooks}")
        self.model = model.eval()
        self.num_codebooks, self.spec = num_codebooks, spec
        self.codebook_size = cfg.codebook_size

    @classmethod
    def from_codec(cls, spec: str, num_codebooks: int | None = None) -> CodecTokenizer:
        """A codec by model spec (`kyutai/mimi`, a local folder), using its first `num_codebooks`."""
        from transformers import MimiModel

        from ..pretrained import resolve

        return cls(MimiModel.from_pretrained(resolve(spec)), num_codebooks, spec)

    @property
    def vocab_size(self) -> int:
        return self.num_codebooks * self.codebook_size

    @property
    def frame_rate(self) -> float:
        return float(self.model.config.frame_rate)

    @property
    def sampling_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def tokens_per_frame(self) -> int:
        return self.num_codebooks

    @property
    def offsets(self) -> np.ndarray:
        return np.arange(self.num_codebooks) * self.codebook_size  # (N,)

    @torch.no_grad()
    def codes(self, audio: np.ndarray) -> np.ndarray:
        """Raw codes of one clip: (N, frames), each in [0, codebook_size)."""
        x = torch.from_numpy(np.asarray(audio, dtype=np.float32))[None, None]  # (1, 1, T)
        out = self.model.encode(x, num_quantizers=self.num_codebooks)
        return out.audio_codes[0].cpu().numpy()  # (N, frames)

    def encode_batch(self, waves: list[np.ndarray]) -> list[list[int]]:
        # Clip by clip: Mimi's convolutions are causal and its padding mask only trims the end, so a
        # batch would give the same codes at more cost in padding.
        return [self.flatten(self.codes(w)) for w in waves]

    def flatten(self, codes: np.ndarray) -> list[int]:
        """(N, frames) codes -> frame-major ids with per-codebook offsets."""
        return (codes + self.offsets[:, None]).T.reshape(-1).tolist()  # (frames, N) -> (frames * N,)

    def unflatten(self, ids: list[int]) -> np.ndarray:
        """Frame-major ids -> (N, frames) codes; every id must sit in its position's codebook."""
        ids = np.asarray(ids, dtype=np.int64)
        N = self.num_codebooks
        if ids.ndim != 1 or len(ids) == 0 or len(ids) % N:
            raise AudioTokenizerError(f"codec ids come in frames of {N} (one per codebook); found {len(ids)} ids")
        frames = ids.reshape(-1, N) - self.offsets  # (frames, N)
        bad = np.argwhere((frames < 0) | (frames >= self.codebook_size))
        if len(bad):
            f, q = bad[0]
            raise AudioTokenizerError(f"id {ids[f * N + q]} at position {f * N + q} (frame {f}) should belong to codebook {q}, "
                                      f"i.e. lie in [{q * self.codebook_size}, {(q + 1) * self.codebook_size}); "
                                      f"{len(bad)} id(s) are out of place")
        return frames.T  # (N, frames)

    @torch.no_grad()
    def decode(self, ids: list[int]) -> np.ndarray:
        codes = torch.from_numpy(self.unflatten(ids))[None]  # (1, N, frames)
        return self.model.decode(codes).audio_values[0, 0].cpu().numpy().astype(np.float32)  # (T,)

    def config(self) -> dict:
        return {"codec": self.spec, "num_codebooks": self.num_codebooks, "codebook_size": self.codebook_size}

    def save_pretrained(self, folder: str | Path, save_codec: bool | None = None) -> None:
        """Save the settings; the codec's weights too (as `codec/`) if it has no spec to reload it from."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if save_codec or (save_codec is None and self.spec is None):
            self.model.save_pretrained(folder / "codec")
            self.spec = None
        super().save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CodecTokenizer:
        from transformers import MimiModel

        from ..pretrained import resolve

        folder = Path(folder)
        config = read_config(folder)
        spec = config.get("codec")
        source = resolve(spec) if spec else folder / "codec"
        if not spec and not (folder / "codec").is_dir():
            raise AudioTokenizerError(f"{folder}: codec tokenizer with neither a codec spec nor a codec/ folder")
        tok = cls(MimiModel.from_pretrained(source), config["num_codebooks"], spec)
        if tok.codebook_size != config.get("codebook_size", tok.codebook_size):
            raise AudioTokenizerError(f"{folder}: saved for codebooks of {config['codebook_size']} codes, "
                                      f"the codec {spec} has {tok.codebook_size}")
        return tok
