"""Shared fixtures: real FSDD speech (skipped with a reason where absent) and tiny models.

Tiny models are built from configs, as transformers tests its own models; they use the real
SmolLM2 tokenizer and Whisper feature extractor from the bundled weights (converted once into the
earful cache), so prompts, chat templates and mel features are the real ones.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from earful.data.fsdd import default_fsdd_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: fail fast instead of retrying

ROOT = Path(__file__).resolve().parents[1]
FSDD = default_fsdd_dir()
FSDD_REC = FSDD / "recordings"
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "yweweler")


# In CI every part is installed and ../shared is beside the checkout, so a skip means a test did
# not run that should have: the run fails on any skip whose reason is not one of these (hardware
# or a model hub this machine does not have). EARFUL_ALLOW_SKIPS=1 lifts the check.
ALLOWED_SKIP_REASONS = ("CUDA", "GPU", "model hub")
_unexpected_skips: list[str] = []


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _strict_skips() -> bool:
    return in_ci() and not os.environ.get("EARFUL_ALLOW_SKIPS")


def pytest_runtest_logreport(report):
    if report.skipped and _strict_skips():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(ok in reason for ok in ALLOWED_SKIP_REASONS):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("unexpected skips (CI allows only: " + ", ".join(ALLOWED_SKIP_REASONS) + ")")
        for line in _unexpected_skips:
            terminalreporter.write_line(line)


def fsdd_available() -> bool:
    return FSDD_REC.is_dir() and any(FSDD_REC.glob("*.wav"))


@pytest.fixture(scope="session")
def fsdd() -> Path:
    if not fsdd_available():
        pytest.skip(f"FSDD not found at {FSDD} (set EARFUL_FSDD to the folder holding recordings/)")
    return FSDD


def fsdd_clip(name: str, sampling_rate: int = 16000) -> np.ndarray:
    from earful.audio import load_audio

    return load_audio(FSDD_REC / name, sampling_rate)


@pytest.fixture(scope="session")
def smol_dir() -> str:
    from earful.pretrained import resolve

    return resolve("bundled:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def whisper_dir() -> str:
    from earful.pretrained import resolve

    return resolve("bundled:whisper-tiny.en")


class Steps:
    """Counts the model's forward calls: one per generated token once the prompt is in."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, *_):
        self.n += 1


def tiny_configs(vocab_size: int):
    from transformers import LlamaConfig, WhisperConfig

    enc = WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=2, decoder_layers=1, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, vocab_size=100,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
    )
    txt = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=vocab_size, tie_word_embeddings=True, max_position_embeddings=512,
    )
    return enc, txt


@pytest.fixture
def tiny_lm(smol_dir, whisper_dir):
    """A tiny random listening LM with the real tokenizer and feature extractor."""
    from transformers import AutoFeatureExtractor, AutoTokenizer

    from earful.models.build import assemble

    tok = AutoTokenizer.from_pretrained(smol_dir)
    enc, txt = tiny_configs(len(tok))
    torch.manual_seed(0)
    model, processor = assemble(enc, txt, tok, AutoFeatureExtractor.from_pretrained(whisper_dir), stack_factor=2, projector_hidden_size=48)
    return model.eval(), processor


# The README's main job, shortened: recipes/digits.yaml trained on two FSDD speakers. Trained once
# per session; the end-to-end test checks the run itself, the serving tests talk to the result.
DIGITS_TRAIN_SPEAKERS = "jackson,lucas"
DIGITS_HELD_OUT = "yweweler"
DIGITS_STEPS = 80


@pytest.fixture(scope="session")
def digits_model(fsdd, smol_dir, whisper_dir, tmp_path_factory):
    """(model folder, train manifest, held-out manifest, the train command's CompletedProcess)."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("digits")
    train, evals, out = work / "train.jsonl", work / "eval.jsonl", work / "model"
    # A developer's shortcut: a folder a previous session filled. Never in CI, which tests the training too.
    reuse = None if in_ci() else os.environ.get("EARFUL_TEST_DIGITS_RUN")
    if reuse:
        reuse = Path(reuse)
        return reuse / "model", reuse / "train.jsonl", reuse / "eval.jsonl", subprocess.CompletedProcess([], 0, "", "")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "earful", *map(str, args)], capture_output=True, text=True)

    for manifest, speakers in ((train, DIGITS_TRAIN_SPEAKERS), (evals, DIGITS_HELD_OUT)):
        r = cli("data", "prepare", "fsdd", fsdd, "--out", manifest, "--speakers", speakers)
        assert r.returncode == 0, r.stderr
    # DIGITS_STEPS steps of 16 clips (the encoder's LoRA adapters train, so its outputs are not cached).
    r = cli("train", ROOT / "recipes" / "digits.yaml", "--out", out, "--set", f"data.train={train}", f"data.eval={evals}",
            f"train.max_steps={DIGITS_STEPS}", "train.warmup_steps=8", "train.eval_every=0", "train.log_every=1", "train.save_every=0")
    return out, train, evals, r


@contextlib.contextmanager
def uvicorn_in_thread(app, start_timeout: float = 60):
    """A real uvicorn server for `app` on a free 127.0.0.1 port, in a thread of this process: yields the port."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
