"""`SpeechLMProcessor`: waveforms and prompts -> the tensors `SpeechLMForConditionalGeneration` takes.

It owns the LLM's tokenizer (with `<|audio|>` added) and the encoder's feature extractor, and it
writes one `<|audio|>` placeholder per audio position, so the model's count check always holds.
Features are computed clip by clip, without padding to 30 s, then padded to the batch's longest
clip with a mask (the encoder masks padding out, so a clip encodes the same alone or in a batch).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer

from .configuration import SpeechLMConfig
from .encoders import encoder_output_lengths, stacked_lengths

PROCESSOR_FILE = "earful_processor.json"
DEFAULT_PROMPT = "Transcribe the audio: <|audio|>"


@dataclass
class PromptFormat:
    """How a prompt is laid out around the audio."""

    system_prompt: str | None = None  # None: the chat template's own default system message
    use_chat_template: bool = True  # False: the prompt text goes in raw (base LMs without a template)
    default_prompt: str = DEFAULT_PROMPT  # the user turn the model was trained with; transcribe/eval reuse it


def max_audio_seconds(feature_extractor, encoder_config) -> float | None:
    """The longest clip this encoder reads whole, in seconds; None where it has no limit (wav2vec2, HuBERT).

    Whisper's feature extractor stops at `n_samples` (30 s) and its positional embeddings at
    `max_source_positions` frames (1,500 at 50 Hz, the same 30 s); anything longer would be cut.
    """
    if encoder_config.model_type != "whisper":
        return None
    samples = encoder_config.max_source_positions * 2 * feature_extractor.hop_length  # conv2 has stride 2
    return min(feature_extractor.n_samples, samples) / feature_extractor.sampling_rate


def min_audio_samples(feature_extractor, encoder_config) -> int:
    """The fewest samples (at the extractor's rate) that give the encoder one frame."""
    if encoder_config.model_type == "whisper":
        return feature_extractor.n_fft // 2 + 1  # the STFT's reflect padding needs more samples than half a window
    n = 1
    for kernel, stride in reversed(list(zip(encoder_config.conv_kernel, encoder_config.conv_stride))):
        n = (n - 1) * stride + kernel  # the convolutional front end's receptive field
    return n


def check_audio_length(feature_extractor, encoder_config, n_samples: int, name: str = "<audio>") -> None:
    """Raise `AudioTooLong` / `AudioTooShort` for a clip of `n_samples` (at the extractor's rate) that
    the encoder would cut or could not read.

    TODO: long-form audio (a window per 30 s, its own issue) lifts the upper limit; until then
    nothing may take more audio than it uses.
    """
    from ..audio import AudioTooLong, AudioTooShort

    rate = feature_extractor.sampling_rate
    limit = max_audio_seconds(feature_extractor, encoder_config)
    if limit is not None and n_samples > round(limit * rate):
        raise AudioTooLong(name, f"{n_samples / rate:.1f} s long; this model's encoder ({encoder_config.model_type}) takes "
                                 f"at most {limit:.1f} s; split it with `earful data segment`")
    shortest = min_audio_samples(feature_extractor, encoder_config)
    if n_samples < shortest:
        raise AudioTooShort(name, f"{n_samples} samples ({n_samples / rate * 1000:.1f} ms) at {rate} Hz; this model's encoder "
                                  f"({encoder_config.model_type}) needs at least {shortest} ({shortest / rate * 1000:.1f} ms); drop the clip")


def clip_features(feature_extractor, encoder_config, wave: np.ndarray, name: str = "<audio>") -> np.ndarray:
    """One clip's features, time on the last axis: (F, T) mel frames (Whisper: no 30 s padding) or (T,) samples.

    A clip longer than the encoder takes (`max_audio_seconds`) or too short to give it one frame
    raises `AudioTooLong` / `AudioTooShort` naming `name`: it is never silently cut.
    """
    check_audio_length(feature_extractor, encoder_config, len(wave), name)
    kwargs = {"sampling_rate": feature_extractor.sampling_rate, "return_tensors": "np"}
    if encoder_config.model_type == "whisper":
        out = feature_extractor(wave, padding="longest", **kwargs)
    else:
        out = feature_extractor(wave, **kwargs)
    return out["input_features" if "input_features" in out else "input_values"][0]


def pad_features(feats: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Clips' features padded to the longest: `input_features` (B, F, T) or (B, T), `input_features_mask` (B, T)."""
    lengths = [f.shape[-1] for f in feats]
    T = max(lengths)
    batch = np.zeros((len(feats), *feats[0].shape[:-1], T), dtype=np.float32)
    mask = np.zeros((len(feats), T), dtype=np.int64)
    for i, (f, n) in enumerate(zip(feats, lengths)):
        batch[i, ..., :n] = f
        mask[i, :n] = 1
    return {"input_features": torch.from_numpy(batch), "input_features_mask": torch.from_numpy(mask)}


def featurize(feature_extractor, encoder_config, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Each clip's features alone, then padded to the longest with a mask (`clip_features` + `pad_features`)."""
    return pad_features([clip_features(feature_extractor, encoder_config, w, f"<audio {i}>") for i, w in enumerate(waves)])


class SpeechLMProcessor:
    def __init__(self, tokenizer, feature_extractor, config: SpeechLMConfig, prompt_format: PromptFormat | None = None):
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.config = config
        self.prompt_format = prompt_format or PromptFormat()
        if self.prompt_format.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the LLM's tokenizer has no chat template: set prompt_format.use_chat_template=false (model.chat_template: false in a recipe)"
            )

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    @classmethod
    def from_pretrained(cls, folder: str | Path, config: SpeechLMConfig | None = None) -> SpeechLMProcessor:
        folder = Path(folder)
        config = config or SpeechLMConfig.from_pretrained(folder)
        fmt_path = folder / PROCESSOR_FILE
        fmt = PromptFormat(**json.loads(fmt_path.read_text())) if fmt_path.exists() else PromptFormat()
        return cls(AutoTokenizer.from_pretrained(folder), AutoFeatureExtractor.from_pretrained(folder), config, fmt)

    @staticmethod
    def from_pretrained_sampling_rate(folder: str | Path) -> int:
        """The audio rate a saved model wants, read without loading anything heavy."""
        from ..pretrained import resolve

        path = Path(resolve(str(folder))) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent}: not an earful model folder (no preprocessor_config.json)")
        return int(json.loads(path.read_text())["sampling_rate"])

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        self.feature_extractor.save_pretrained(folder)
        (folder / PROCESSOR_FILE).write_text(json.dumps(asdict(self.prompt_format), indent=2) + "\n")

    # -- audio -----------------------------------------------------------------------------------
    def featurize(self, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Waveforms at `sampling_rate` -> padded `input_features` (B, F, T) or (B, T) and mask (B, T)."""
        return featurize(self.feature_extractor, self.config.encoder_config, waves)

    def audio_positions(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """LLM positions each clip takes, from its feature length."""
        return stacked_lengths(encoder_output_lengths(self.config.encoder_config, feature_lengths), self.config.stack_factor)

    # -- text ------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, n_audio: int) -> list[int]:
        """Token ids of a user turn holding one `<|audio|>`, expanded to `n_audio` placeholders."""
        token = self.config.audio_token
        if prompt.count(token) != 1:
            raise ValueError(f"a prompt must hold exactly one {token} placeholder, found {prompt.count(token)} in {prompt!r}")
        return self.conversation_ids([{"role": "user", "content": prompt}], [n_audio])

    def conversation_ids(self, messages: list[dict], n_audio: list[int]) -> list[int]:
        """Token ids of a conversation ending in a user turn, ready for the assistant's answer.

        `messages` are `{"role", "content"}` dicts whose text holds one `<|audio|>` per clip, in
        order; clip i takes `n_audio[i]` positions. Without a system message, the model's own
        (the one it was trained with) goes first.
        """
        token = self.config.audio_token
        found = sum(m["content"].count(token) for m in messages)
        if found != len(n_audio):
            raise ValueError(f"the conversation holds {found} {token} placeholders for {len(n_audio)} clips")
        if self.prompt_format.use_chat_template:
            if self.prompt_format.system_prompt is not None and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": self.prompt_format.system_prompt}, *messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "\n".join(m["content"] for m in messages)
        pieces = text.split(token)
        text = pieces[0] + "".join(token * n + rest for n, rest in zip(n_audio, pieces[1:]))
        return self.tokenizer(text, add_special_tokens=not self.prompt_format.use_chat_template)["input_ids"]

    def response_ids(self, response: str) -> list[int]:
        """The answer's tokens and the end-of-turn token, which teaches the model to stop."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    def __call__(
        self,
        audio: list[np.ndarray] | None = None,
        prompts: list[str] | str = DEFAULT_PROMPT,
        responses: list[str] | None = None,
        audio_features: dict[str, torch.Tensor] | None = None,
        padding_side: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Build a batch. With `responses`, `labels` cover the response tokens only (-100 elsewhere).

        `audio_features` may replace `audio` when features are already computed (the trainer
        caches them). Padding is on the right for training, on the left for generation.
        """
        features = audio_features if audio_features is not None else self.featurize(audio)
        n_audio = self.audio_positions(features["input_features_mask"].sum(-1)).tolist()
        return {**self.text_batch(prompts, n_audio, responses, padding_side), **features}

    def text_batch(
        self,
        prompts: list[str] | str,
        n_audio: list[int],
        responses: list[str] | None = None,
        padding_side: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` (and `labels` with responses) for clips of `n_audio` positions."""
        B = len(n_audio)
        prompts = [prompts] * B if isinstance(prompts, str) else list(prompts)
        rows, label_rows = [], []
        for i in range(B):
            ids = self.prompt_ids(prompts[i], n_audio[i])
            labels = [-100] * len(ids)
            if responses is not None:
                answer = self.response_ids(responses[i])
                ids, labels = ids + answer, labels + answer
            rows.append(ids)
            label_rows.append(labels)
        padding_side = padding_side or ("right" if responses is not None else "left")
        batch = self.pad(rows, padding_side)
        if responses is not None:
            batch["labels"] = self.pad(label_rows, padding_side, pad_id=-100)["input_ids"]
        return batch

    def pad(self, rows: list[list[int]], padding_side: str = "left", pad_id: int | None = None) -> dict[str, torch.Tensor]:
        """Id lists of different lengths -> `input_ids` (B, L) and `attention_mask` (B, L)."""
        if pad_id is None:
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        B, L = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        for i, ids in enumerate(rows):
            span = slice(0, len(ids)) if padding_side == "right" else slice(L - len(ids), L)
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
