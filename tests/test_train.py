"""The trainer end to end through the CLI, on real FSDD speech, with tiny models saved as folders.

The tiny encoder and LLM are written as ordinary transformers folders, so the run goes through the
same model-spec resolution, loading, caching, checkpointing and saving as a real one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_configs
from earful.data.fsdd import fsdd_utterances
from earful.data.manifest import write_manifest

from test_data import run_cli


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory, smol_dir, whisper_dir):
    """(encoder folder, llm folder): tiny random Whisper and Llama with the real tokenizer/features."""
    from transformers import AutoFeatureExtractor, AutoTokenizer, LlamaForCausalLM, WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("tiny_parts")
    tok = AutoTokenizer.from_pretrained(smol_dir)
    enc_cfg, txt_cfg = tiny_configs(len(tok))
    torch.manual_seed(0)
    WhisperForConditionalGeneration(enc_cfg).save_pretrained(root / "whisper")
    AutoFeatureExtractor.from_pretrained(whisper_dir).save_pretrained(root / "whisper")
    LlamaForCausalLM(txt_cfg).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root / "whisper", root / "llm"


@pytest.fixture(scope="module")
def manifests(fsdd, tmp_path_factory):
    root = tmp_path_factory.mktemp("manifests")
    train = [u for u in fsdd_utterances(fsdd, ["jackson", "lucas"]) if int(u.id.rsplit("_", 1)[1]) < 3]  # 60 clips
    evals = [u for u in fsdd_utterances(fsdd, ["george"]) if int(u.id.rsplit("_", 1)[1]) < 1]  # 10 clips
    write_manifest(train, root / "train.jsonl")
    write_manifest(evals, root / "eval.jsonl")
    return root / "train.jsonl", root / "eval.jsonl"


def recipe_args(tiny_parts, manifests, **train):
    enc, llm = tiny_parts
    # The trainer's mechanics on digits.yaml's layout, with the encoder frozen whole (outputs cached): no encoder LoRA.
    sets = [f"model.encoder={enc}", f"model.llm={llm}", "model.stack_factor=2", "model.projector_hidden_size=64", "model.lora=null",
            f"data.train={manifests[0]}", f"data.eval={manifests[1]}", "train.batch_size=8", "train.warmup_steps=2",
            "data.no_speech_clips=0"]  # the mechanics on the manifests alone (no-speech clips: tests/test_nonspeech.py)
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return ["--set", *sets]


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_train_cli_end_to_end(tiny_parts, manifests, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", Path(__file__).parents[1] / "recipes" / "digits.yaml", "--out", out,
                *recipe_args(tiny_parts, manifests, max_steps=30, lr=2e-2, eval_every=15, log_every=1),
                "model.freeze_decoder=false")  # a random tiny LLM must learn too; a real one stays frozen
    assert r.returncode == 0, r.stderr[-3000:]
    rows = log_rows(out)
    losses = [row["loss"] for row in rows if "loss" in row]
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    assert len(losses) == 30 and len(evals) == 2
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # it learns
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 30 and summary["train_utterances"] == 60
    assert not (out / "checkpoints").exists()  # the finished model supersedes them

    # The output is a save_pretrained folder; the frozen encoder kept its weights, the LLM learnt.
    from earful.models.build import load_speech_lm

    model, processor = load_speech_lm(out)
    saved = load_file(str(out / "model.safetensors"))
    enc_ref = load_file(str(tiny_parts[0] / "model.safetensors"))
    llm_ref = load_file(str(tiny_parts[1] / "model.safetensors"))
    torch.testing.assert_close(saved["audio_tower.layers.0.fc1.weight"], enc_ref["model.encoder.layers.0.fc1.weight"], rtol=0, atol=0)
    assert not torch.equal(saved["language_model.model.layers.1.mlp.up_proj.weight"], llm_ref["model.layers.1.mlp.up_proj.weight"])
    assert processor.prompt_format.system_prompt == "You transcribe speech."


@pytest.mark.parametrize("warmup,total", [(15, 150), (0, 7), (5, 5), (8, 3)])
def test_warmup_cosine_is_transformers_schedule(warmup, total):
    from transformers import get_cosine_schedule_with_warmup

    from earful.train.optim import warmup_cosine

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        sched, seen = make(opt, warmup, total), []
        for _ in range(total + 2):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen

    assert lrs(warmup_cosine) == pytest.approx(lrs(get_cosine_schedule_with_warmup), rel=1e-12, abs=1e-15)


def test_kill_minus_9_then_resume_continues_the_same_run(tiny_parts, manifests, tmp_path):
    steps = dict(max_steps=60, lr=3e-3, eval_every=0, log_every=1, save_every=5)
    straight = tmp_path / "straight"
    r = run_cli("train", Path(__file__).parents[1] / "recipes" / "digits.yaml", "--out", straight, *recipe_args(tiny_parts, manifests, **steps))
    assert r.returncode == 0, r.stderr[-3000:]

    crashed = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "earful", "train", str(Path(__file__).parents[1] / "recipes" / "digits.yaml"), "--out", str(crashed),
           *map(str, recipe_args(tiny_parts, manifests, **steps))]
    _kill_after_first_checkpoint(cmd, crashed, {**os.environ})  # asserts a checkpoint, log rows past it, and no model yet
    assert not list(crashed.glob("*.tmp"))  # nothing half-written under a final name

    # A recipe that changes the run is refused, naming what differs; how often it saves may change.
    r = run_cli("train", Path(__file__).parents[1] / "recipes" / "digits.yaml", "--out", crashed, "--resume",
                *recipe_args(tiny_parts, manifests, **steps), "train.lr=1e-2", "train.batch_size=4", "train.save_every=7")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "train.batch_size: saved 8, now 4; train.lr: saved 0.003, now 0.01)" in r.stderr, r.stderr[-3000:]
    r = run_cli("train", Path(__file__).parents[1] / "recipes" / "digits.yaml", "--out", crashed, "--resume",
                *recipe_args(tiny_parts, manifests, **steps), "train.save_every=7")
    assert r.returncode == 0, r.stderr[-3000:]
    want = {row["step"]: row["loss"] for row in log_rows(straight) if "loss" in row}
    rows = [row for row in log_rows(crashed) if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, 61))  # each step once: the killed run's rows past the checkpoint are gone
    for row in rows:
        assert row["loss"] == pytest.approx(want[row["step"]], rel=1e-5, abs=1e-6), row["step"]
    # Time carries over the resume: elapsed_s never goes back, and train_seconds counts both parts.
    elapsed = [row["elapsed_s"] for row in rows]
    assert elapsed == sorted(elapsed)
    assert json.loads((crashed / "train_summary.json").read_text())["train_seconds"] >= elapsed[-1]
    # One TensorBoard run in one folder: the killed run's events past the checkpoint are purged.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(crashed / "tb")).Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 61))
    assert [e.value for e in acc.Scalars("elapsed_s")] == pytest.approx(elapsed, abs=0.01)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    # The recipe's frozen LLM is untouched; the projector is the same as an uninterrupted run's.
    llm_ref = load_file(str(tiny_parts[1] / "model.safetensors"))
    torch.testing.assert_close(b["language_model.model.layers.1.mlp.up_proj.weight"], llm_ref["model.layers.1.mlp.up_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(a["multi_modal_projector.linear_2.weight"], b["multi_modal_projector.linear_2.weight"], rtol=1e-5, atol=1e-6)


def test_training_the_encoder_without_a_cache(tiny_parts, manifests, tmp_path):
    out = tmp_path / "unfrozen"
    r = run_cli("train", Path(__file__).parents[1] / "recipes" / "digits.yaml", "--out", out,
                *recipe_args(tiny_parts, manifests, max_steps=3, eval_every=0), "model.freeze_encoder=false",
                "model.gradient_checkpointing=true")
    assert r.returncode == 0, r.stderr[-3000:]
    saved = load_file(str(out / "model.safetensors"))
    enc_ref = load_file(str(tiny_parts[0] / "model.safetensors"))
    assert not torch.equal(saved["audio_tower.layers.0.fc1.weight"], enc_ref["model.encoder.layers.0.fc1.weight"])


def test_corrupt_clips_are_skipped_and_recorded_not_met_mid_run(tiny_parts, manifests, tmp_path):
    """A truncated WAV and a text file named .wav among FSDD clips: the encoder trains (no cache),
    so today's trainer would meet them at whichever step draws them (and again on every --resume).
    Every clip is checked before the first step; the two are left out, named in a warning and in
    OUT/rejects.jsonl, and training runs on the rest. Nothing usable at all is one clear error."""
    from earful.data.manifest import Utterance, read_manifest

    good = read_manifest(manifests[0])[:16]
    data = Path(good[0].audio).read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])  # a download that stopped half-way
    (tmp_path / "notes.wav").write_text("transcripts to do\n")
    bad = [Utterance(audio=str(tmp_path / "cut.wav"), text="zero", id="cut"), Utterance(audio=str(tmp_path / "notes.wav"), text="one", id="notes")]
    write_manifest([*good[:5], bad[0], *good[5:11], bad[1], *good[11:]], tmp_path / "train.jsonl")
    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    out = tmp_path / "run"
    r = run_cli("train", recipe, "--out", out, *recipe_args(tiny_parts, manifests, max_steps=3, eval_every=0, log_every=1, save_every=0),
                f"data.train={tmp_path / 'train.jsonl'}", "model.freeze_encoder=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipping {tmp_path / 'cut.wav'} (AudioCorrupt): truncated WAV file" in r.stderr
    assert f"skipping {tmp_path / 'notes.wav'} (AudioNotAudio)" in r.stderr
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(row["id"], row["error"]) for row in rejects] == [("cut", "AudioCorrupt"), ("notes", "AudioNotAudio")]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["train_utterances"] == 16 and summary["skipped_clips"] == 2

    write_manifest(bad, tmp_path / "bad.jsonl")
    r = run_cli("train", recipe, "--out", tmp_path / "none", *recipe_args(tiny_parts, manifests, max_steps=3), f"data.train={tmp_path / 'bad.jsonl'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "bad.jsonl: none of its 2 clips is usable" in r.stderr


def test_no_setting_is_changed_silently(tiny_parts, manifests, tmp_path):
    """LoRA over freeze_*=false, the prefix cache off (the LLM trains; gradient checkpointing),
    warm-up clamped to max_steps, bf16-stored weights trained in float32: each says old and new."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(tiny_parts[1]).to(torch.bfloat16).save_pretrained(tmp_path / "llm_bf16")
    AutoTokenizer.from_pretrained(tiny_parts[1]).save_pretrained(tmp_path / "llm_bf16")
    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    r = run_cli("train", recipe, "--out", tmp_path / "run", *recipe_args(tiny_parts, manifests, max_steps=2, eval_every=0, save_every=0,
                                                                        warmup_steps=10, text_gate="off"),
                f"model.llm={tmp_path / 'llm_bf16'}", "model.lora=both", "model.freeze_encoder=false", "model.freeze_decoder=false",
                "model.gradient_checkpointing=true")
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("model.lora=both: model.freeze_decoder false -> true for the llm's base weights",
                 "model.lora=both: model.freeze_encoder false -> true for the encoder's base weights",
                 "train.prefix_cache: true -> off, because the LLM trains (model.freeze_decoder=false or model.lora on the llm) "
                 "and model.gradient_checkpointing=true",
                 "train.warmup_steps: 10 -> 2, because train.max_steps=2",
                 f"model.llm={tmp_path / 'llm_bf16'}: weights stored as bfloat16 -> loaded and trained as float32"):
        assert re.search(rf"WARNING earful\.train\.\w+: {re.escape(line)}", r.stderr), line


def test_train_without_hooks_runs_no_evaluation_of_eval_and_says_so(tiny_parts, manifests, tmp_path, caplog):
    """train/ imports nothing from eval/: `train()` called without hooks (as a script or benchmark
    may) trains, but with no text-ability scorer the gate is off and with no answer generator no
    samples are logged; a recipe that asked for them is told so, old and new value."""
    from earful.train.recipe import load_recipe
    from earful.train.trainer import train

    sets = recipe_args(tiny_parts, manifests, max_steps=2, eval_every=2, save_every=0, text_gate="on", log_samples=2)[1:]
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "digits.yaml", [str(s) for s in sets])
    with caplog.at_level("WARNING", logger="earful.train"):
        summary = train(recipe, tmp_path / "run")
    assert summary["steps"] == 2 and summary["eval_loss"] is not None and "text_ability" not in summary
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("train.text_gate: on -> off, because train() was given no text-ability scorer") for m in said), said
    assert any(m.startswith("train.log_samples: 2 -> 0, because train() was given no answer generator") for m in said), said
    assert not (tmp_path / "run" / "text_ability_before.json").exists()


def test_bad_recipe_is_one_clear_error(tmp_path):
    r = run_cli("train", Path(__file__).parents[1] / "recipes" / "digits.yaml", "--out", tmp_path / "x", "--set", "train.batch_size=0", "train.nope=1")
    assert r.returncode == 2
    assert "train.batch_size" in r.stderr and "train.nope" in r.stderr and "Traceback" not in r.stderr


def test_training_reads_the_pre_encoded_store(tiny_parts, manifests, tmp_path):
    """`earful data encode` fills a store; `data.encoded` makes the trainer read the frozen encoder's
    outputs from it instead of running the encoder, with the same losses."""
    store = tmp_path / "store"
    r = run_cli("data", "encode", "--data", manifests[0], "--out", store, "--encoder", tiny_parts[0], "--batch-size", 8)
    assert r.returncode == 0, r.stderr[-2000:]
    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    args = recipe_args(tiny_parts, manifests, max_steps=4, eval_every=0, log_every=1, save_every=0)
    plain = run_cli("train", recipe, "--out", tmp_path / "plain", *args)
    stored = run_cli("-v", "train", recipe, "--out", tmp_path / "stored", *args, f"data.encoded={store}")
    assert plain.returncode == 0 and stored.returncode == 0, stored.stderr[-3000:]
    assert "60 of 60 clips read from" in stored.stderr and "0 of 10 clips read from" in stored.stderr  # eval clips are not in it
    a = [row["loss"] for row in log_rows(tmp_path / "plain") if "loss" in row]
    b = [row["loss"] for row in log_rows(tmp_path / "stored") if "loss" in row]
    assert len(a) == 4 and a == pytest.approx(b, abs=1e-4)


def test_lora_with_layer_dropping_and_the_text_gate(tiny_parts, manifests, tmp_path):
    """LoRA on the LLM (peft) after keeping every 2nd decoder layer: only adapters and projector
    train, the saved folder is a plain model with the adapters merged and one layer fewer, and the
    text-ability gate measures the LLM before and after (and fails the run past its limit)."""
    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    args = recipe_args(tiny_parts, manifests, max_steps=6, eval_every=0, log_every=1, save_every=0, lr=5e-2)
    out = tmp_path / "lora"
    r = run_cli("train", recipe, "--out", out, *args, "model.lora=llm", "model.lora_r=4", "model.keep_every_nth_layer=2")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert "LoRA on language_model" in r.stderr and "kept 1 of 2 decoder layers" in r.stderr
    gate = summary["text_ability"]
    assert gate["before"]["mc_questions"] == 40 and "text_nll_increase" in gate and summary["text_gate_passed"]

    saved = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in saved)  # merged: loads without peft
    assert not any(k.startswith("language_model.model.layers.1.") for k in saved)
    enc_ref = load_file(str(tiny_parts[0] / "model.safetensors"))
    llm_ref = load_file(str(tiny_parts[1] / "model.safetensors"))
    torch.testing.assert_close(saved["audio_tower.layers.0.fc1.weight"], enc_ref["model.encoder.layers.0.fc1.weight"], rtol=0, atol=0)
    # Layer 0 kept its place; LoRA's merged update moved its linear weights, not the norms it does not touch.
    assert not torch.equal(saved["language_model.model.layers.0.self_attn.q_proj.weight"], llm_ref["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(saved["language_model.model.layers.0.input_layernorm.weight"], llm_ref["model.layers.0.input_layernorm.weight"], rtol=0, atol=0)

    from earful.models.build import load_speech_lm

    model, _ = load_speech_lm(out)
    assert model.config.text_config.num_hidden_layers == 1 and len(model.language_model.model.layers) == 1

    # The same run under a limit it does not meet (no rise at all; its NLL rose): the model is
    # saved, the run fails with the reason.
    assert gate["text_nll_increase"] > 0, gate
    r = run_cli("train", recipe, "--out", tmp_path / "strict", *args, "model.lora=llm", "model.lora_r=4", "model.keep_every_nth_layer=2",
                "train.max_text_nll_increase=0")
    assert r.returncode == 3 and "lost text ability" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "strict" / "model.safetensors").exists()


# grad_accum=2 with loss_weights: each rank's share of a micro-batch weighs its summed token
# weights, and each micro-batch counts 1/grad_accum, so gradients (hence clipping and the logged
# grad_norm) are one process's, under DDP and FSDP alike.
ACCUM_WEIGHTED = ("train.grad_accum=2", "train.loss_weights={text: 1.0, special: 4.0}")


@pytest.mark.parametrize("variant", ["ddp_and_nodes", "accum2_weighted"])
def test_two_torchrun_processes_match_one(tiny_parts, manifests, tmp_path, variant):
    """torchrun --nproc_per_node 2 (gloo, CPU): each rank takes half of every batch, DDP averages the
    gradients, and the loss and grad-norm curves are the one process's with the same global batch.
    `ddp_and_nodes`: then the same over two "nodes": two torchrun agents, one process each, meeting
    through the multi-node rendezvous flags (--nnodes 2 --node-rank i --master-addr/--master-port).
    `accum2_weighted`: grad_accum=2 and loss_weights, under DDP and under FSDP2, on answers of
    varied length (so the ranks' shares hold different mixes of text and end-of-turn tokens)."""
    from earful.data.manifest import read_manifest

    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    args = [*map(str, recipe_args(tiny_parts, manifests, max_steps=5, eval_every=0, log_every=1, save_every=0, lr=2e-2)),
            "model.freeze_decoder=false"]
    if variant == "accum2_weighted":
        rows = read_manifest(manifests[0])
        for i, u in enumerate(rows):
            u.response = u.text if i % 3 else f"the digit {u.text}, spoken by {u.speaker}"
        write_manifest(rows, tmp_path / "varied.jsonl")
        args += [*ACCUM_WEIGHTED, f"data.train={tmp_path / 'varied.jsonl'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = run_cli("train", recipe, "--out", tmp_path / "one", *args, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    a = curves(tmp_path / "one")
    assert len(a["loss"]) == 5 and a["loss"][-1] < a["loss"][0]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    for mode in ("ddp",) if variant == "ddp_and_nodes" else ("ddp", "fsdp"):
        two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "earful", "train", str(recipe), "--out", str(tmp_path / mode),
                              *args, f"train.parallel={mode}"], capture_output=True, text=True, env=env, timeout=600)
        assert two.returncode == 0, two.stderr[-3000:]
        b = curves(tmp_path / mode)
        assert len(b["loss"]) == 5  # one log, written once (rank 0)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), mode
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6), mode
        assert json.loads((tmp_path / mode / "train_summary.json").read_text())["world_size"] == 2
        # The same weights come out.
        wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / mode / "model.safetensors"))
        for k in ("multi_modal_projector.linear_1.weight", "language_model.model.layers.1.mlp.up_proj.weight"):
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    if variant != "ddp_and_nodes":
        return

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--node-rank", str(i), "--nproc_per_node", "1", "--master-addr", "127.0.0.1",
                               "--master-port", str(port), "-m", "earful", "train", str(recipe), "--out", str(tmp_path / "nodes"),
                               *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for i in (0, 1)]
    errs = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    c = curves(tmp_path / "nodes")
    assert c["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5) and c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6)


def curves(out: Path) -> dict[str, list[float]]:
    """The logged training loss and grad norm, step by step."""
    rows = [row for row in log_rows(out) if "loss" in row]
    return {"loss": [row["loss"] for row in rows], "grad_norm": [row["grad_norm"] for row in rows]}


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_after_first_checkpoint(cmd: list[str], out: Path, env: dict) -> str:
    """Run `cmd`, kill -9 it and every process under it (torchrun's workers too) once
    out/checkpoints/latest exists and the log holds a step past it (which a resume must not
    repeat); returns its stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300

    def past_checkpoint() -> bool:
        try:
            saved = int((out / "checkpoints" / "latest").read_text().split("-")[1])
            return any(json.loads(line).get("step", 0) > saved for line in (out / "train_log.jsonl").read_text().splitlines()[-3:])
        except (OSError, ValueError, IndexError):  # not there yet, or a line half-written
            return False

    while not past_checkpoint() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    err = proc.communicate()[1]
    assert (out / "checkpoints" / "latest").exists(), "the run ended before its first checkpoint: make steps slower\n" + err[-3000:]
    assert not (out / "model.safetensors").exists(), err[-3000:]
    return err


def test_fsdp_on_two_torchrun_processes_resumes_across_world_sizes(tiny_parts, manifests, tmp_path):
    """train.parallel=fsdp: two torchrun processes (gloo, CPU) each hold half of every parameter
    (FSDP2 fully_shard), and their loss curve is one process's with the same global batch.
    Checkpoints are sharded and keyed by name, so a run killed (-9) on two FSDP ranks resumes on ONE
    process, and a run killed on one process resumes on two FSDP ranks; either way every step's
    loss, the eval losses and the final weights are the uninterrupted one-process run's."""
    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    args = [*map(str, recipe_args(tiny_parts, manifests, max_steps=30, eval_every=10, log_every=1, save_every=3, lr=1e-2)),
            "model.freeze_decoder=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "earful", "-v", "train", str(recipe)]
    one = run_cli("train", recipe, "--out", tmp_path / "one", *args, "train.save_every=0", env=env)
    assert one.returncode == 0, one.stderr[-3000:]

    # Two FSDP ranks, killed, resumed on one process.
    a = tmp_path / "two_then_one"
    err = _kill_after_first_checkpoint([*torchrun, "--out", str(a), *args, "train.parallel=fsdp"], a, env)
    assert "FSDP2: 4 blocks" in err, err[-3000:]  # 2 encoder + 2 decoder layers, each its own shard group
    latest = a / "checkpoints" / (a / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in latest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    r = run_cli("-v", "train", recipe, "--out", a, "--resume", *args, env=env)
    assert r.returncode == 0 and "saved by 2 process(es), now 1" in r.stderr, r.stderr[-3000:]

    # One process, killed, resumed on two FSDP ranks (which gather the model whole to save it).
    b = tmp_path / "one_then_two"
    _kill_after_first_checkpoint([sys.executable, "-m", "earful", "train", str(recipe), "--out", str(b), *args], b, env)
    r = subprocess.run([*torchrun, "--out", str(b), "--resume", *args, "train.parallel=fsdp"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "saved by 1 process(es), now 2" in r.stderr, r.stderr[-3000:]
    assert json.loads((b / "train_summary.json").read_text())["parallel"] == "fsdp"

    want = {row["step"]: row["loss"] for row in log_rows(tmp_path / "one") if "loss" in row}
    want_norm = {row["step"]: row["grad_norm"] for row in log_rows(tmp_path / "one") if "loss" in row}
    want_eval = {row["step"]: row["eval_loss"] for row in log_rows(tmp_path / "one") if "eval_loss" in row}
    assert sorted(want) == list(range(1, 31)) and sorted(want_eval) == [10, 20, 30] and want[30] < want[1]
    ref = load_file(str(tmp_path / "one" / "model.safetensors"))
    for run in (a, b):
        rows = log_rows(run)
        assert [row["step"] for row in rows if "loss" in row] == list(range(1, 31))  # each step once, over the kill
        got = {row["step"]: row["loss"] for row in rows if "loss" in row}
        norms = {row["step"]: row["grad_norm"] for row in rows if "loss" in row}
        got_eval = {row["step"]: row["eval_loss"] for row in rows if "eval_loss" in row}
        assert sorted(got_eval) == [10, 20, 30]
        for step in range(1, 31):
            assert got[step] == pytest.approx(want[step], rel=1e-3, abs=1e-5), (run.name, step)
            assert norms[step] == pytest.approx(want_norm[step], rel=1e-3, abs=1e-5), (run.name, step)
        for step in (10, 20, 30):
            assert got_eval[step] == pytest.approx(want_eval[step], rel=1e-3, abs=1e-5), (run.name, step)
        w = load_file(str(run / "model.safetensors"))
        for k in ("multi_modal_projector.linear_1.weight", "language_model.model.layers.1.mlp.up_proj.weight"):
            torch.testing.assert_close(w[k], ref[k], rtol=1e-3, atol=1e-4)
        assert not (run / "checkpoints").exists()


def test_compile_gives_the_eager_losses(tiny_parts, manifests, tmp_path):
    """train.compile: every transformer block goes through torch.compile (inductor, dynamic shapes),
    and the loss curve is the eager run's."""
    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    args = recipe_args(tiny_parts, manifests, max_steps=4, eval_every=0, log_every=1, save_every=0, lr=2e-2)
    eager = run_cli("train", recipe, "--out", tmp_path / "eager", *args, "model.freeze_decoder=false")
    compiled = run_cli("-v", "train", recipe, "--out", tmp_path / "compiled", *args, "model.freeze_decoder=false", "train.compile=true")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    assert "torch.compile: 4 blocks" in compiled.stderr
    a = [row["loss"] for row in log_rows(tmp_path / "eager") if "loss" in row]
    b = [row["loss"] for row in log_rows(tmp_path / "compiled") if "loss" in row]
    assert len(a) == 4 and b == pytest.approx(a, rel=1e-4, abs=1e-5)


def test_packing_gives_the_padded_losses(tiny_parts, manifests, tmp_path):
    """train.packing: consecutive utterances share a row with no attention across them; the loss
    curve is the padded run's. Refused where it does not apply (dpo)."""
    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    args = recipe_args(tiny_parts, manifests, max_steps=2, eval_every=0, log_every=1, save_every=0, lr=2e-2)
    padded = run_cli("train", recipe, "--out", tmp_path / "padded", *args)
    packed = run_cli("-v", "train", recipe, "--out", tmp_path / "packed", *args, "train.packing=true", "train.pack_tokens=400")
    assert padded.returncode == 0 and packed.returncode == 0, packed.stderr[-3000:]
    rows = re.search(r"train.packing: the first batch's 8 rows of (\d+) tokens packed into (\d+) rows", packed.stderr)
    assert rows and int(rows.group(2)) < 8, packed.stderr[-3000:]
    a = [row["loss"] for row in log_rows(tmp_path / "padded") if "loss" in row]
    b = [row["loss"] for row in log_rows(tmp_path / "packed") if "loss" in row]
    assert len(a) == 2 and b == pytest.approx(a, rel=1e-4, abs=1e-5)
    from earful.train.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="train.packing"):
        load_recipe(recipe, ["train.packing=true", "train.objective=dpo"])


def test_adamw8bit_keeps_8_bit_state_and_resumes_exactly(tiny_parts, manifests, tmp_path):
    """train.optimizer=adamw8bit (bitsandbytes): the moments are stored in 8 bits (seen in the
    checkpoint), the model learns, and a run killed -9 resumes to the uninterrupted run's losses."""
    import torch.distributed.checkpoint as dcp

    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    args = [*map(str, recipe_args(tiny_parts, manifests, max_steps=40, eval_every=0, log_every=1, save_every=4, lr=1e-2, optimizer="adamw8bit")),
            "model.freeze_decoder=false"]
    straight = run_cli("train", recipe, "--out", tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = tmp_path / "crashed"
    _kill_after_first_checkpoint([sys.executable, "-m", "earful", "train", str(recipe), "--out", str(crashed), *args], crashed, {**os.environ})
    latest = crashed / "checkpoints" / (crashed / "checkpoints" / "latest").read_text().strip()
    meta = dcp.FileSystemReader(str(latest)).read_metadata().state_dict_metadata
    key = "optim.state.multi_modal_projector.linear_1.weight.__bnb_optimizer_quant_state__.state1"  # AdamW8bit's first moment
    assert meta[key].properties.dtype == torch.uint8
    r = run_cli("train", recipe, "--out", crashed, "--resume", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    want = {row["step"]: row["loss"] for row in log_rows(tmp_path / "straight") if "loss" in row}
    got = {row["step"]: row["loss"] for row in log_rows(crashed) if "loss" in row}
    assert [row["step"] for row in log_rows(crashed) if "loss" in row] == list(range(1, 41)) and sum(list(want.values())[-5:]) < 0.8 * sum(list(want.values())[:5])
    for step in range(1, 41):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_samples_and_wandb_offline(tiny_parts, manifests, tmp_path):
    """At eval steps the eval clips' audio and the model's answers go to TensorBoard and, offline,
    to Weights & Biases, next to every logged metric."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'earful[track]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    out = tmp_path / "run"
    r = run_cli("train", recipe, "--out", out, *recipe_args(tiny_parts, manifests, max_steps=4, eval_every=2, log_every=1, save_every=0,
                                                               log_samples=2, wandb="offline"))
    assert r.returncode == 0, r.stderr[-3000:]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"audio": 0, "tensors": 0}).Reload()
    assert {"sample_0/audio", "sample_1/audio"} <= set(acc.Tags()["audio"])
    assert [e.step for e in acc.Audio("sample_0/audio")] == [2, 4]
    assert any(t.startswith("sample_0/answer") for t in acc.Tags()["tensors"])
    [run_dir] = list((out / "wandb").glob("offline-run-*"))
    assert list(run_dir.glob("*.wandb")) and (run_dir / "files").is_dir()


def test_dpo_raises_the_chosen_over_rejected_margin(tiny_parts, manifests, tmp_path):
    """train.objective=dpo on spoken pairs (chosen: the clip's digit; rejected: a refusal): the
    reference is the starting model, its log-probs computed once; over every pair the DPO loss falls
    below log 2 (no preference), and the frozen encoder keeps its weights."""
    from earful.data.manifest import read_manifest

    rows = read_manifest(manifests[0])
    for u in rows:
        u.chosen, u.rejected = u.text, "Sorry, I cannot tell."
    pairs = tmp_path / "pairs.jsonl"
    write_manifest(rows, pairs)
    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    args = recipe_args(tiny_parts, manifests, max_steps=12, eval_every=0, log_every=1, save_every=0, lr=1e-2,
                       objective="dpo", dpo_beta=0.5)
    out = tmp_path / "dpo"
    # A tiny random LLM must learn too (a real one could stay frozen and let the projector move).
    r = run_cli("train", recipe, "--out", out, *args, f"data.train={pairs}", f"data.eval={pairs}",
                "model.freeze_decoder=false", "train.text_gate=off")
    assert r.returncode == 0, r.stderr[-3000:]
    logged = log_rows(out)
    margins = [row["reward_margin"] for row in logged if "reward_margin" in row]
    assert len(margins) == 12 and abs(margins[0]) < 1e-3  # step 1: the policy is the reference
    [final] = [row["eval_loss"] for row in logged if "eval_loss" in row]
    assert final < 0.6, final  # log 2 = 0.693 when nothing is preferred
    assert sum(margins[-4:]) / 4 > sum(margins[:4]) / 4
    saved = load_file(str(out / "model.safetensors"))
    enc_ref = load_file(str(tiny_parts[0] / "model.safetensors"))
    torch.testing.assert_close(saved["audio_tower.layers.0.fc1.weight"], enc_ref["model.encoder.layers.0.fc1.weight"], rtol=0, atol=0)
    # On two torchrun ranks, DDP or FSDP2, each rank takes half of every batch's pairs: same losses and margins.
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    want = [(row["loss"], row["reward_margin"]) for row in logged if "loss" in row]
    for mode in ("ddp", "fsdp"):
        two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "earful", "train", str(recipe), "--out", str(tmp_path / mode),
                              *map(str, args), f"data.train={pairs}", f"data.eval={pairs}", "model.freeze_decoder=false", "train.text_gate=off",
                              f"train.parallel={mode}"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert two.returncode == 0, two.stderr[-3000:]
        got = [(row["loss"], row["reward_margin"]) for row in log_rows(tmp_path / mode) if "loss" in row]
        assert len(got) == 12
        for (la, ma), (lb, mb) in zip(want, got):
            assert lb == pytest.approx(la, rel=1e-3, abs=1e-4) and mb == pytest.approx(ma, rel=1e-3, abs=1e-3), mode
    # Rows without a pair are refused with the reason.
    r = run_cli("train", recipe, "--out", tmp_path / "bad", *args)
    assert r.returncode == 2 and "needs chosen and rejected" in r.stderr and "Traceback" not in r.stderr


def test_distillation_from_the_text_llm_lowers_the_kl(tiny_parts, manifests, tmp_path):
    """train.distill_weight=1 (Ultravox): the student hears the clip, the teacher (the same frozen LLM)
    reads its transcript; the KL between their answers falls, and the LLM is untouched."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    # A tiny LLM with large random weights, so that its answers depend on what it reads (a default
    # tiny init is near-uniform whatever the input, and every KL would start at ~0).
    tok = AutoTokenizer.from_pretrained(tiny_parts[1])
    _, cfg = tiny_configs(len(tok))
    cfg.initializer_range = 0.5
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    parts = (tiny_parts[0], tmp_path / "llm")
    recipe = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    out = tmp_path / "kd"
    r = run_cli("train", recipe, "--out", out, *recipe_args(parts, manifests, max_steps=40, eval_every=0, log_every=1, save_every=0,
                                                              lr=3e-2, distill_weight=1.0))
    assert r.returncode == 0, r.stderr[-3000:]
    kl = [row["distill_kl"] for row in log_rows(out) if "distill_kl" in row]
    assert len(kl) == 40 and sum(kl[:10]) / 10 > 0.5 and sum(kl[-10:]) / 10 < 0.85 * sum(kl[:10]) / 10, kl
    saved = load_file(str(out / "model.safetensors"))
    llm_ref = load_file(str(tmp_path / "llm" / "model.safetensors"))
    torch.testing.assert_close(saved["language_model.model.layers.1.mlp.up_proj.weight"], llm_ref["model.layers.1.mlp.up_proj.weight"], rtol=0, atol=0)
    # A teacher that would train along with the student is refused.
    r = run_cli("train", recipe, "--out", tmp_path / "bad", *recipe_args(tiny_parts, manifests, max_steps=1, distill_weight=0.5),
                "model.freeze_decoder=false")
    assert r.returncode == 2 and "must stay fixed" in r.stderr
