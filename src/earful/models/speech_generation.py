"""Speech continuation with a units LM: a spoken prompt's tokens in, more sound tokens out.

    lm = load_unit_lm("runs/units/continuation")
    out = continue_speech(lm, load_audio("prompt.wav", lm.audio_tokenizer.sampling_rate))
    out.continuation_units        # audio-tokenizer ids; lm.audio_tokenizer.decode(...) for a codec

Generation runs transformers' `generate` (sampling, greedy, beams alike) with a logits processor
that allows only sound tokens and `<|sound_end|>` (which stops it), and, for a codec tokenizer,
only the codebook whose turn it is in the frame, so every continuation decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .vocab import UnitLM


class SoundOnly(LogitsProcessor):
    """Mask every token but the sound tokens allowed at this step and `<|sound_end|>`.

    With `tokens_per_frame` N > 1 (a codec), new token j (counting from the first unit of the
    prompt, `units_before` of them) must come from codebook (units_before + j) mod N, and the end
    may come only between frames.
    """

    def __init__(self, first_unit_id: int, n_units: int, end_id: int, prompt_len: int,
                 units_before: int, tokens_per_frame: int = 1):
        self.first, self.n, self.end = first_unit_id, n_units, end_id
        self.prompt_len, self.units_before, self.N = prompt_len, units_before, tokens_per_frame
        self.codebook = n_units // tokens_per_frame

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len  # tokens generated so far
        q = (self.units_before + step) % self.N
        lo = self.first + q * self.codebook
        hi = lo + (self.codebook if self.N > 1 else self.n)
        mask = torch.full_like(scores, float("-inf"))
        mask[:, lo:hi] = 0
        if q == 0:
            mask[:, self.end] = 0
        return scores + mask


@dataclass
class Continuation:
    prompt_units: list[int]
    continuation_units: list[int]
    info: dict = field(default_factory=dict)


@torch.no_grad()
def generate_units(lm: UnitLM, prompt_units: list[int], max_new_tokens: int = 100, do_sample: bool = True,
                   temperature: float = 0.8, top_k: int = 50, seed: int | None = 0, **kwargs) -> list[int]:
    """Sound-token continuation (audio-tokenizer ids) of `prompt_units`, stopped at `<|sound_end|>`."""
    v = lm.vocab
    prompt = [v.sound_start_id, *v.token_ids(prompt_units)]
    N = lm.audio_tokenizer.tokens_per_frame if lm.audio_tokenizer is not None else 1
    processor = SoundOnly(v.first_unit_id, v.n_units, v.sound_end_id, len(prompt), len(prompt_units), N)
    if seed is not None:
        torch.manual_seed(seed)
    device = next(lm.model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if do_sample else {"do_sample": False}
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            logits_processor=LogitsProcessorList([processor]), eos_token_id=v.sound_end_id,
                            pad_token_id=v.sound_end_id, **sampling, **kwargs)
    new = out[0, len(prompt):].tolist()
    if v.sound_end_id in new:
        new = new[: new.index(v.sound_end_id)]
    units = v.units(new)
    return units[: len(units) - len(units) % N]  # whole frames only (max_new_tokens may cut one)


def continue_speech(lm: UnitLM, audio: np.ndarray, **generate_kwargs) -> Continuation:
    """Tokenise a spoken prompt (at the audio tokenizer's rate) and continue it."""
    if lm.audio_tokenizer is None:
        raise ValueError("this units LM was saved without an audio tokenizer (audio_tokenizer/): it cannot read audio")
    prompt = lm.audio_tokenizer.encode(audio)
    return Continuation(prompt, generate_units(lm, prompt, **generate_kwargs))
