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
from transformers import AutoFeatureExtractor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.utils import PROCESSOR_NAME

from .configuration import ModelInputError, SpeechLMConfig
from .encoders import encoder_output_lengths, stacked_lengths

PROCESSOR_FILE = "earful_processor.json"  # the prompt format of folders saved before processor_config.json
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


def pad_ids(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths -> ids (B, L) padded with `pad_id` and mask (B, L).

    earful's one padding helper: right padding for training and scoring (each row starts at 0),
    left padding for generation (every row ends where the new tokens start).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(L - len(row), L)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


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


class SpeechLMProcessor(ProcessorMixin):
    """The listening LM's processor, a transformers `ProcessorMixin` (as Voxtral's and Qwen2-Audio's):
    `AutoProcessor.from_pretrained(folder)`, `save_pretrained`, and `apply_chat_template` with audio
    content parts, beside earful's own calls (`processor(waves, prompts, responses)`, `text_batch`,
    `conversation_ids`, `pad`, `decode`) that the trainer, eval and the server use.

    tokenizer: the LLM's, with `<|audio|>` added. feature_extractor: the encoder's.
    config: the model's `SpeechLMConfig`; the processor reads (and saves) its audio token, stack
    factor and encoder config, which say how many placeholders a clip takes.
    prompt_format: how a prompt is laid out (system prompt, chat template or raw, default prompt).
    """

    def __init__(self, tokenizer=None, feature_extractor=None, config: SpeechLMConfig | dict | None = None,
                 prompt_format: PromptFormat | dict | None = None, chat_template: str | None = None):
        if config is None:
            raise ModelInputError("SpeechLMProcessor needs the model's SpeechLMConfig (config=...): it says how many placeholders a clip takes")
        self.config = SpeechLMConfig(**config) if isinstance(config, dict) else config
        self.prompt_format = PromptFormat(**prompt_format) if isinstance(prompt_format, dict) else (prompt_format or PromptFormat())
        self.audio_token, self.audio_token_id = self.config.audio_token, self.config.audio_token_id
        super().__init__(tokenizer, feature_extractor, chat_template=chat_template)
        if self.prompt_format.use_chat_template and not self._template():
            raise ModelInputError(
                "the LLM's tokenizer has no chat template: set prompt_format.use_chat_template=false (model.chat_template: false in a recipe)"
            )

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "input_features_mask"]

    def _template(self, chat_template: str | None = None) -> str | None:
        return chat_template or self.chat_template or getattr(self.tokenizer, "chat_template", None)

    # -- saving and loading ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """processor_config.json: the feature extractor, the prompt format, and the config fields it reads."""
        out = super().to_dict()
        c = self.config
        out["config"] = {"audio_token": c.audio_token, "audio_token_id": c.audio_token_id, "stack_factor": c.stack_factor,
                         "encoder_config": c.encoder_config.to_dict()}
        out["prompt_format"] = asdict(self.prompt_format)
        return out

    def save_pretrained(self, save_directory, **kwargs):
        files = super().save_pretrained(save_directory, **kwargs)
        # The feature extractor's own file too: what reads the audio rate or the extractor alone
        # (`from_pretrained_sampling_rate`, `AutoFeatureExtractor`) finds it where it always was.
        self.feature_extractor.save_pretrained(save_directory)
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, config: SpeechLMConfig | None = None, **kwargs) -> SpeechLMProcessor:
        """A saved processor (`AutoProcessor.from_pretrained` ends here). `config`, when given (the
        loaded model's), replaces the fields read from the folder, so processor and model share it.

        Folders saved before the processor was a ProcessorMixin (no processor_config.json: the
        prompt format in earful_processor.json) load too.
        """
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir() and not (folder / PROCESSOR_NAME).is_file():
            fmt_path = folder / PROCESSOR_FILE
            fmt = PromptFormat(**json.loads(fmt_path.read_text())) if fmt_path.exists() else PromptFormat()
            return cls(AutoTokenizer.from_pretrained(folder), AutoFeatureExtractor.from_pretrained(folder),
                       config or SpeechLMConfig.from_pretrained(folder), fmt)
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if config is not None:
            processor.config = config
        return processor

    @staticmethod
    def from_pretrained_sampling_rate(folder: str | Path) -> int:
        """The audio rate a saved model wants, read without loading anything heavy."""
        from ..pretrained import resolve

        path = Path(resolve(str(folder))) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent}: not an earful model folder (no preprocessor_config.json)")
        return int(json.loads(path.read_text())["sampling_rate"])

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
            raise ModelInputError(f"a prompt must hold exactly one {token} placeholder, found {prompt.count(token)} in {prompt!r}")
        return self.conversation_ids([{"role": "user", "content": prompt}], [n_audio])

    def conversation_text(self, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None,
                          **template_kwargs) -> str:
        """A conversation laid out as the model reads it, one `<|audio|>` per clip (not yet expanded).

        `messages` are `{"role", "content"}` dicts with text content. Without a system message, the
        model's own (the one it was trained with) goes first.
        """
        if self.prompt_format.use_chat_template:
            if self.prompt_format.system_prompt is not None and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": self.prompt_format.system_prompt}, *messages]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                                      chat_template=self._template(chat_template), **template_kwargs)
        return "\n".join(m["content"] for m in messages)

    def expanded_ids(self, text: str, n_audio: list[int]) -> list[int]:
        """Token ids of laid-out text, its i-th `<|audio|>` expanded to `n_audio[i]` placeholders."""
        token = self.config.audio_token
        pieces = text.split(token)
        if len(pieces) - 1 != len(n_audio):
            raise ModelInputError(f"the text holds {len(pieces) - 1} {token} placeholders for {len(n_audio)} clips")
        text = pieces[0] + "".join(token * n + rest for n, rest in zip(n_audio, pieces[1:]))
        return self.tokenizer(text, add_special_tokens=not self.prompt_format.use_chat_template)["input_ids"]

    def conversation_ids(self, messages: list[dict], n_audio: list[int]) -> list[int]:
        """Token ids of a conversation ending in a user turn, ready for the assistant's answer.

        `messages` are `{"role", "content"}` dicts whose text holds one `<|audio|>` per clip, in
        order; clip i takes `n_audio[i]` positions. Without a system message, the model's own
        (the one it was trained with) goes first.
        """
        token = self.config.audio_token
        found = sum(m["content"].count(token) for m in messages)
        if found != len(n_audio):
            raise ModelInputError(f"the conversation holds {found} {token} placeholders for {len(n_audio)} clips")
        return self.expanded_ids(self.conversation_text(messages), n_audio)

    def response_ids(self, response: str) -> list[int]:
        """The answer's tokens and the end-of-turn token, which teaches the model to stop."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    # -- chat templates with audio parts, as transformers' audio processors take them -------------
    def _load_part(self, part: dict, where: str) -> np.ndarray:
        if "audio" in part:
            wave = part["audio"]
            wave = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
            return wave.astype(np.float32).reshape(-1)  # a waveform at the feature extractor's rate
        source = part.get("path", part.get("url"))
        if not isinstance(source, (str, Path)):
            raise ModelInputError(f"{where}: an audio part holds 'audio' (a waveform at {self.sampling_rate} Hz), 'path' or 'url'; found {sorted(part)}")
        if str(source).startswith(("http://", "https://")):
            from transformers.audio_utils import load_audio as load_url

            return np.asarray(load_url(str(source), sampling_rate=self.sampling_rate), dtype=np.float32)
        from ..audio import load_audio

        return load_audio(source, self.sampling_rate)

    def _text_messages(self, conversation: list[dict], where: str) -> tuple[list[dict], list[np.ndarray]]:
        """Messages with content parts -> text messages (one `<|audio|>` per audio part) and the clips.

        Parts are joined by spaces, and a turn of audio alone asks the default prompt, as the
        server lays out a request (so both give the ids the model was trained on).
        """
        token, messages, waves = self.config.audio_token, [], []
        for i, m in enumerate(conversation):
            content = m.get("content")
            if isinstance(content, str):
                messages.append({"role": m["role"], "content": content})
                continue
            pieces, n_clips = [], 0
            for j, part in enumerate(content or []):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if token in part["text"]:
                        raise ModelInputError(f"{where}[{i}].content[{j}]: text may not hold {token}; give audio as an audio part")
                    if part["text"].strip():
                        pieces.append(part["text"].strip())
                elif kind == "audio":
                    waves.append(self._load_part(part, f"{where}[{i}].content[{j}]"))
                    pieces.append(token)
                    n_clips += 1
                else:
                    raise ModelInputError(f"{where}[{i}].content[{j}]: expected a {{'type': 'text'}} or {{'type': 'audio'}} part, found {part!r:.80}")
            text = " ".join(pieces)
            if n_clips == 1 and text == token:
                text = self.prompt_format.default_prompt
            messages.append({"role": m["role"], "content": text})
        return messages, waves

    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = False, return_dict: bool = False,
                            return_tensors: str | None = "pt", padding_side: str = "left", **template_kwargs):
        """A conversation (or a batch of them) with audio content parts, as transformers' audio
        processors take it: `{"type": "audio", "path" | "url" | "audio": ...}` and `{"type": "text", "text": ...}`.

        tokenize=False: the laid-out text (one `<|audio|>` per clip), to pass back as `processor(text=..., audio=...)`.
        tokenize=True: the input ids; with return_dict=True the whole batch `generate` takes
        (`input_ids`, `attention_mask`, `input_features`, `input_features_mask`), left-padded.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        texts, clips = [], []
        for c, conv in enumerate(conversations):
            messages, waves = self._text_messages(list(conv), f"conversation[{c}]" if batched else "conversation")
            texts.append(self.conversation_text(messages, add_generation_prompt, chat_template, **template_kwargs))
            clips.append(waves)
        if not tokenize:
            return texts if batched else texts[0]
        out = self(text=texts, audio=[w for ws in clips for w in ws] or None, padding_side=padding_side, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    # -- batches ---------------------------------------------------------------------------------
    def __call__(
        self,
        audio: list[np.ndarray] | None = None,
        prompts: list[str] | str | None = None,
        responses: list[str] | None = None,
        audio_features: dict[str, torch.Tensor] | None = None,
        padding_side: str | None = None,
        text: list[str] | str | None = None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Build a batch. With `responses`, `labels` cover the response tokens only (-100 elsewhere).

        `prompts` are user turns holding one `<|audio|>` each, one per clip (default: the prompt the
        model was trained with), laid out by the processor. `text` instead is text already laid
        out (`apply_chat_template(..., tokenize=False)`), its `<|audio|>`s taking the clips in
        order, as transformers' processors take it. `audio_features` may replace `audio` when
        features are already computed (the trainer caches them). Padding is on the right for
        training, on the left for generation.
        """
        if return_tensors not in ("pt", None):
            raise ModelInputError(f"return_tensors: only 'pt' (torch) is supported, found {return_tensors!r}")
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ModelInputError(f"audio at {sampling_rate} Hz: this model's feature extractor takes {self.sampling_rate} Hz; "
                                  f"resample it first (earful.audio.load_audio(path, {self.sampling_rate}))")
        if audio is None and audio_features is None and text is None:
            raise ModelInputError("give audio (waveforms), audio_features, or text")
        features = audio_features if audio_features is not None else (self.featurize(audio) if audio is not None else {})
        n_audio = self.audio_positions(features["input_features_mask"].sum(-1)).tolist() if features else []
        if text is None:
            batch = self.text_batch(prompts or self.prompt_format.default_prompt, n_audio, responses, padding_side)
        else:
            if prompts is not None or responses is not None:
                raise ModelInputError("give either text (laid out) or prompts/responses (user turns), not both")
            texts = [text] if isinstance(text, str) else list(text)
            token, rows, k = self.config.audio_token, [], 0
            for t in texts:
                rows.append(self.expanded_ids(t, n_audio[k : k + t.count(token)]))
                k += t.count(token)
            if k != len(n_audio):
                raise ModelInputError(f"the text holds {k} {token} placeholders for {len(n_audio)} clips")
            batch = self.pad(rows, padding_side or "left")
        return BatchFeature({**batch, **features})

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
        input_ids, attention_mask = pad_ids(rows, pad_id, padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids, **kwargs) -> list[str] | str:
        """A batch of id rows (B, L) -> their texts, stripped, special tokens skipped (earful's form);
        one row (L,) -> its text, as transformers' `decode` gives it."""
        if isinstance(ids, torch.Tensor) and ids.ndim == 1 or (isinstance(ids, list) and ids and isinstance(ids[0], int)):
            return self.tokenizer.decode(ids, **kwargs)
        kwargs.setdefault("skip_special_tokens", True)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, **kwargs)]
