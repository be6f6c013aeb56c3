"""Recipes: one YAML file = one reproducible run, read into typed dataclasses.

`--set section.key=value` overrides any field (the value is parsed as YAML, so `3`, `1e-3`,
`true` and `null` mean what they say). Every problem in a recipe is reported at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..models.configuration import AUDIO_TOKEN
from ..models.processing import DEFAULT_PROMPT
from ..errors import EarfulError


class RecipeError(EarfulError, ValueError):
    """A recipe that cannot run; the message lists every problem found."""


@dataclass
class ModelRecipe:
    kind: str = "listening"  # listening (encoder -> projector -> LLM) | units (sound tokens in the LLM's vocabulary)
    audio_tokenizer: str | None = None  # units: an audio tokenizer folder (earful units fit)
    encoder: str = "bundled:whisper-tiny.en"  # model spec: hub id, local folder or bundled:NAME
    llm: str = "bundled:smollm2-135m-instruct"  # model spec of the causal LM
    init_from: str | None = None  # a trained earful folder to continue from (encoder/llm then unused)
    stack_factor: int = 4  # encoder frames per LLM position: 50 Hz / 4 = 12.5 Hz for Whisper
    projector_hidden_size: int = 1024  # the projector MLP's hidden width
    projector_dropout: float = 0.0  # dropout on the projector's input while training
    audio_norm: str | None = None  # utterance: each clip's encoder frames to zero mean, unit variance per channel (CMVN)
    system_prompt: str | None = None  # null: the chat template's own default system message
    chat_template: bool = True  # false for base LMs without a chat template
    freeze_encoder: bool = True  # frozen encoder outputs are computed once and cached
    freeze_projector: bool = False
    freeze_decoder: bool = True  # keeps the LLM's text ability intact
    gradient_checkpointing: bool = False  # trade compute for memory in the trained parts
    lora: str | None = None  # LoRA adapters (peft) on: llm | encoder | both; only they train in that part, merged on save
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    keep_every_nth_layer: int = 1  # layer dropping: keep decoder layers 0, n, 2n, ... of the LLM (1: all)


@dataclass
class DataRecipe:
    train: str | None = None  # manifest (JSONL) to train on
    eval: str | None = None  # manifest for periodic evaluation (loss)
    prompt: str = DEFAULT_PROMPT  # user turn for utterances without their own prompt
    max_seconds: float = 30.0  # longer clips are refused (Whisper's window)
    speed_perturb: list = field(default_factory=lambda: [1.0])  # speed-perturbed copies, e.g. [0.9, 1.0, 1.1]
    encoded: str | None = None  # a store `earful data encode` filled: a frozen encoder's outputs are read from it
    augment: dict | None = field(default_factory=dict)  # training audio's augmentations, each with its p (earful.data.augment); {}: none
    no_speech_clips: int = 0  # generated clips that hold no speech (earful.data.nonspeech), trained to answer no_speech_answer
    no_speech_answer: str = "I could not hear any speech."  # the one answer to silence, noise, hum, clicks, tones, music
    format: str = "speech"  # units: speech | asr | tts | interleaved | aligned (earful.data.sequences)
    text_delay: float = 0.0  # units, aligned: seconds a word's text follows its speech (< 0: text first)
    max_span_words: int = 3  # units, interleaved: longest run of words in one modality


@dataclass
class TrainRecipe:
    max_steps: int = 200  # optimizer steps
    batch_size: int = 16  # utterances per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 0 at max_steps
    max_grad_norm: float = 1.0  # gradient clipping
    eval_every: int = 50  # steps between evaluations (0: only at the end)
    save_every: int = 100  # steps between resumable checkpoints (0: never)
    log_every: int = 10  # steps between log lines
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    num_threads: int | None = None  # torch CPU threads (null: torch's default)
    parallel: str = "ddp"  # under torchrun: ddp (each rank holds the model) | fsdp (FSDP2 fully_shard: each rank holds 1/N)
    compile: bool = False  # torch.compile each transformer block (dynamic shapes), as torchtitan does
    optimizer: str = "adamw"  # adamw (torch) | adamw8bit (bitsandbytes: optimizer state in 8 bits, ~1/4 of AdamW's memory)
    loss_weights: dict = field(default_factory=dict)  # per token type: text, semantic, acoustic, special (train/losses.py)
    distill_weight: float = 0.0  # listening: share of the loss that is KL to the text-only LLM given the transcript (Ultravox)
    objective: str = "sft"  # sft (next-token loss on the response) | dpo (preference pairs: manifest chosen/rejected)
    dpo_beta: float = 0.1  # DPO's inverse temperature on the log-ratio margin
    prefix_cache: bool = True  # frozen LLM: keys/values of the prompt prefix all rows share are computed once
    packing: bool = False  # listening sft: consecutive utterances share a row, no attention across them (positions restart)
    pack_tokens: int | None = None  # train.packing: a row's length (null: the batch's longest utterance)
    log_samples: int = 2  # eval clips whose audio and generated answer are logged at each eval (listening family)
    wandb: str = "auto"  # auto (when wandb is installed and WANDB_MODE / WANDB_API_KEY / WANDB_PROJECT is set) | off | offline | online
    wandb_project: str = "earful"
    text_gate: str = "auto"  # text-only check of the LLM before and after: auto (when the LLM trains) | on | off
    max_text_nll_increase: float | None = None  # fail the run when held-out text NLL rises more (nats/token)
    max_mc_accuracy_drop: float | None = None  # fail the run when multiple-choice accuracy falls more (0-1)


@dataclass
class Recipe:
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value: Any, hint: Any) -> bool:
    allowed = getattr(hint, "__args__", (hint,))
    if value is None:
        return type(None) in allowed
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return True
    return any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed if t is not type(None))


def parse_overrides(pairs: list[str]) -> dict:
    """`a.b=value` strings -> a nested dict, values parsed as YAML."""
    tree: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise RecipeError(f"--set {pair!r}: expected section.key=value")
        key, raw = pair.split("=", 1)
        *parents, leaf = key.strip().split(".")
        if not all((*parents, leaf)):
            raise RecipeError(f"--set {pair!r}: expected section.key=value, found an empty name in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {pair!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {pair!r}: {p} was set to a value by another --set, so it has no keys")
        node[leaf] = value
    return tree


def build_recipe(raw: dict, source: str = "recipe") -> Recipe:
    """Typed recipe from a dict; unknown sections or keys and wrong types are all reported at once."""
    problems = []
    sections = {}
    for name, cls in get_type_hints(Recipe).items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            problems.append(f"{name}: expected a mapping, found {values!r}")
            continue
        hints = get_type_hints(cls)
        good = {}
        for key, value in values.items():
            if hints.get(key) is str and isinstance(value, bool):
                value = "on" if value else "off"  # YAML reads a bare on/off as a boolean
            if float in getattr(hints.get(key), "__args__", (hints.get(key),)) and isinstance(value, str):
                try:
                    value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
                except ValueError:
                    pass
            if key not in hints:
                problems.append(f"{name}.{key}: unknown key (known: {', '.join(hints)})")
            elif not _check_type(value, hints[key]):
                problems.append(f"{name}.{key}: expected {hints[key]}, found {value!r}")
            else:
                good[key] = float(value) if hints[key] is float and isinstance(value, int) else value
        sections[name] = cls(**good)  # well-typed keys only, so the value checks below still run
    for name in raw:
        if name not in get_type_hints(Recipe):
            problems.append(f"{name}: unknown section (known: model, data, train)")
    recipe = Recipe(**sections)
    t = recipe.train
    problems += _value_problems(recipe)
    if not isinstance(recipe.data.no_speech_clips, int) or isinstance(recipe.data.no_speech_clips, bool) or recipe.data.no_speech_clips < 0:
        problems.append(f"data.no_speech_clips: expected a whole number >= 0, found {recipe.data.no_speech_clips!r}")
    if not isinstance(recipe.data.no_speech_answer, str) or not recipe.data.no_speech_answer.strip():
        problems.append(f"data.no_speech_answer: expected the answer to audio without speech (text), found {recipe.data.no_speech_answer!r}")
    if not recipe.data.speed_perturb or not all(isinstance(v, (int, float)) and 0.5 <= v <= 2.0 for v in recipe.data.speed_perturb):
        problems.append(f"data.speed_perturb: expected a list of speeds in [0.5, 2], found {recipe.data.speed_perturb!r}")
    problems += _augment_problems(recipe)
    if t.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"train.precision: expected auto, bf16 or fp32, found {t.precision!r}")
    if recipe.data.train is None:
        problems.append("data.train: no training manifest (set it in the recipe or with --set data.train=M.jsonl)")
    if recipe.data.prompt.count(AUDIO_TOKEN) != 1:
        problems.append(f"data.prompt: must hold exactly one {AUDIO_TOKEN}, found {recipe.data.prompt!r}")
    m = recipe.model
    if m.audio_norm not in (None, "utterance"):
        problems.append(f"model.audio_norm: expected utterance (or null), found {m.audio_norm!r}")
    if m.lora not in (None, "llm", "encoder", "both"):
        problems.append(f"model.lora: expected llm, encoder or both (or null), found {m.lora!r}")
    if m.lora and m.kind != "listening":
        problems.append("model.lora: adapters are for the listening family here (a units LM trains its new embeddings in full)")
    from .losses import TYPES

    bad_types = set(recipe.train.loss_weights) - set(TYPES)
    if bad_types:
        problems.append(f"train.loss_weights: unknown token types {sorted(bad_types)} (known: {', '.join(TYPES)})")
    if any(not isinstance(v, (int, float)) or v < 0 for v in recipe.train.loss_weights.values()):
        problems.append(f"train.loss_weights: weights must be numbers >= 0, found {recipe.train.loss_weights}")
    if recipe.train.packing and (m.kind != "listening" or recipe.train.objective != "sft" or recipe.train.distill_weight):
        problems.append("train.packing: packs the listening family's sft rows; not with units, dpo or train.distill_weight")
    if recipe.train.distill_weight and (m.kind != "listening" or recipe.train.objective != "sft"):
        problems.append("train.distill_weight: distillation is for the listening family's sft objective")
    if recipe.train.distill_weight and not m.freeze_decoder and m.lora not in ("llm", "both"):
        problems.append("train.distill_weight: the teacher is the LLM itself, so it must stay fixed: freeze_decoder, or LoRA on the llm")
    if recipe.train.objective not in ("sft", "dpo"):
        problems.append(f"train.objective: expected sft or dpo, found {recipe.train.objective!r}")
    if recipe.train.objective == "dpo" and m.kind == "units":
        from ..data.sequences import PREFERENCE_FORMATS

        if recipe.data.format not in PREFERENCE_FORMATS:
            problems.append(f"train.objective: dpo lays pairs out as {', '.join(PREFERENCE_FORMATS)}, not data.format={recipe.data.format!r}")
    from .parallel import MODES

    if t.parallel not in MODES:
        problems.append(f"train.parallel: expected {' or '.join(MODES)}, found {t.parallel!r}")
    if t.optimizer not in ("adamw", "adamw8bit"):
        problems.append(f"train.optimizer: expected adamw or adamw8bit, found {t.optimizer!r}")
    if t.optimizer == "adamw8bit" and t.parallel == "fsdp":
        problems.append("train.optimizer: adamw8bit keeps whole-tensor 8-bit state, which FSDP's shards do not fit; use adamw with fsdp")
    if recipe.train.wandb not in ("auto", "off", "offline", "online"):
        problems.append(f"train.wandb: expected auto, off, offline or online, found {recipe.train.wandb!r}")
    if recipe.train.text_gate not in ("auto", "on", "off"):
        problems.append(f"train.text_gate: expected auto, on or off, found {recipe.train.text_gate!r}")
    if m.kind not in ("listening", "units"):
        problems.append(f"model.kind: expected listening or units, found {m.kind!r}")
    if m.kind == "units":
        from ..data.sequences import FORMATS

        if m.audio_tokenizer is None and m.init_from is None:
            problems.append("model.audio_tokenizer: a units LM needs an audio tokenizer folder (make one with `earful units fit`)")
        if m.freeze_decoder:
            problems.append("model.freeze_decoder: a units LM learns its new sound tokens inside the LLM; set it to false")
        if recipe.data.format not in FORMATS:
            problems.append(f"data.format: expected one of {', '.join(FORMATS)}, found {recipe.data.format!r}")
    if len(problems) == 1:
        raise RecipeError(f"{source}: {problems[0]}")
    if problems:
        raise RecipeError(f"{source}: {len(problems)} problems:\n  - " + "\n  - ".join(problems))
    return recipe


# The range of every numeric field: (section, key, test, what the test asks). None passes where the
# field may be null. A NaN or an infinity fails every test.
_RANGES = [
    ("model", "stack_factor", lambda v: v >= 1, ">= 1"),
    ("model", "projector_hidden_size", lambda v: v >= 1, ">= 1"),
    ("model", "projector_dropout", lambda v: 0 <= v < 1, "within [0, 1)"),
    ("model", "lora_r", lambda v: v >= 1, ">= 1"),
    ("model", "lora_alpha", lambda v: v > 0, "> 0"),
    ("model", "lora_dropout", lambda v: 0 <= v < 1, "within [0, 1)"),
    ("model", "keep_every_nth_layer", lambda v: v >= 1, ">= 1"),
    ("data", "max_seconds", lambda v: v > 0, "> 0"),
    ("data", "text_delay", lambda v: True, "a number"),
    ("data", "max_span_words", lambda v: v >= 1, ">= 1"),
    ("train", "max_steps", lambda v: v >= 1, ">= 1"),
    ("train", "batch_size", lambda v: v >= 1, ">= 1"),
    ("train", "grad_accum", lambda v: v >= 1, ">= 1"),
    ("train", "lr", lambda v: v > 0, "> 0"),
    ("train", "weight_decay", lambda v: v >= 0, ">= 0"),
    ("train", "warmup_steps", lambda v: v >= 0, ">= 0"),
    ("train", "max_grad_norm", lambda v: v > 0, "> 0 (clipping to 0 zeroes every gradient)"),
    ("train", "eval_every", lambda v: v >= 0, ">= 0 (0: only at the end)"),
    ("train", "save_every", lambda v: v >= 0, ">= 0 (0: never)"),
    ("train", "log_every", lambda v: v >= 1, ">= 1"),
    ("train", "seed", lambda v: 0 <= v < 2**32, "within [0, 2**32)"),
    ("train", "num_threads", lambda v: v >= 1, ">= 1 (or null: torch's default)"),
    ("train", "distill_weight", lambda v: 0 <= v <= 1, "within [0, 1]"),
    ("train", "pack_tokens", lambda v: v is None or v >= 1, "at least 1 (or null)"),
    ("train", "dpo_beta", lambda v: v > 0, "> 0"),
    ("train", "log_samples", lambda v: v >= 0, ">= 0"),
    ("train", "max_text_nll_increase", lambda v: v >= 0, ">= 0 (or null)"),
    ("train", "max_mc_accuracy_drop", lambda v: 0 <= v <= 1, "within [0, 1] (or null)"),
]


def _value_problems(recipe: Recipe) -> list[str]:
    """Numbers out of range, and a device torch cannot name or this machine does not have."""
    problems = []
    for section, key, ok, what in _RANGES:
        v = getattr(getattr(recipe, section), key)
        if v is not None and not (math.isfinite(v) and ok(v)):
            problems.append(f"{section}.{key}: must be {what}, found {v!r}")
    device = recipe.train.device
    if device != "auto":
        import torch

        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            kind = None
        if kind not in ("cpu", "cuda"):
            problems.append(f"train.device: expected auto, cpu, cuda or cuda:N, found {device!r}")
        elif kind == "cuda" and not torch.cuda.is_available():
            problems.append(f"train.device: {device!r} but torch sees no CUDA device here; use auto or cpu")
    return problems


def _augment_problems(recipe: Recipe) -> list[str]:
    """data.augment: each augmentation's keys and ranges (earful.data.augment.parse_augment), and
    what it cannot be combined with here."""
    from ..audio import find_ffmpeg
    from ..data.augment import parse_augment

    spec, problems = parse_augment(recipe.data.augment)
    if problems or not spec.active:
        return problems
    m = recipe.model
    if m.kind != "listening":
        problems.append("data.augment: augmentation is for the listening family (a units LM reads its audio as tokens, made once)")
    if recipe.train.objective == "dpo":
        problems.append("data.augment: DPO's reference log-probs are computed once, on clean audio; augment with train.objective=sft")
    cached = m.freeze_encoder and m.lora not in ("encoder", "both")
    if cached and spec.waves and not spec.copies:
        problems.append(f"data.augment: the frozen encoder's outputs are computed once and cached, so {', '.join(spec.waves)} would be "
                        "drawn once for the whole run; set data.augment.copies: K (K augmented copies of each clip, encoded once, "
                        "each epoch hears one), or let the encoder run every step (model.lora: encoder or model.freeze_encoder: false)")
    if "codec" in spec.waves and find_ffmpeg() is None:
        problems.append("data.augment.codec: MP3/Opus round trips need ffmpeg, which is not installed; "
                        "pip install 'earful[ingest]' (imageio-ffmpeg ships the binary) or drop data.augment.codec")
    return problems


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k, {}), dict) else v
    return out


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file and apply `--set` overrides. Relative manifest paths stay as given."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of sections (model, data, train)")
    return build_recipe(_merge(raw, parse_overrides(list(overrides))), str(path))
