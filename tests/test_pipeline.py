"""The data pipeline on real audio: ingest (folders, CSV, manifests, a parquet dataset, yt-dlp on a
file:// URL), segmenting long recordings (ffmpeg stream copy, Silero VAD), and pre-encoding into a
content-addressed store — split over two real torchrun processes, and killed with -9 midway."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import FSDD_REC

from earful.data.manifest import Utterance, read_manifest, write_manifest

pytestmark = pytest.mark.usefixtures("fsdd")

PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def cli(*args, env=None, **kw):
    return subprocess.run([PY, "-m", "earful", *map(str, args)], capture_output=True, text=True, env=env, **kw)


def bad_inputs(folder: Path) -> dict[str, str]:
    """One file per kind of bad input -> the error class each must be rejected with."""
    folder.mkdir(parents=True, exist_ok=True)
    good = (FSDD_REC / "3_george_0.wav").read_bytes()
    (folder / "empty.wav").write_bytes(b"")
    (folder / "truncated_header.wav").write_bytes(good[:30])
    (folder / "not_audio.wav").write_bytes(b"%PDF-1.7 this is a document, not a recording\n" * 50)
    sf.write(folder / "nan.wav", np.full(8000, np.nan, np.float32), 8000, subtype="FLOAT")
    sf.write(folder / "tiny.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 80).astype(np.float32), 8000)  # 0.01 s
    waves = [sf.read(FSDD_REC / f"{d}_george_0.wav", dtype="float32")[0] for d in range(10)]
    sf.write(folder / "too_long.wav", np.concatenate(waves), 8000)  # ~4 s, over the tests' 3 s limit
    return {"empty": "AudioEmpty", "truncated_header": "AudioCorrupt", "not_audio": "AudioNotAudio", "nan": "AudioNonFinite",
            "tiny": "AudioTooShort", "too_long": "AudioTooLong"}


def long_recording(path: Path, n: int = 40, gap: float = 0.8, speaker: str = "nicolas") -> Path:
    """FSDD clips of one speaker end to end, with silence between: a 'long recording'."""
    parts = []
    for i in range(n):
        w, sr = sf.read(FSDD_REC / f"{i % 10}_{speaker}_{i // 10}.wav", dtype="float32")
        parts += [w, np.zeros(int(gap * sr), np.float32)]
    sf.write(path, np.concatenate(parts), 8000, subtype="PCM_16")
    return path


# -- ingest ---------------------------------------------------------------------------------------
def test_ingest_a_folder_keeps_the_good_and_explains_each_reject(tmp_path):
    src = tmp_path / "src"
    expected = bad_inputs(src / "bad")
    for name in ("3_george_0.wav", "5_lucas_1.wav"):
        (src / name).write_bytes((FSDD_REC / name).read_bytes())
    (src / "3_george_0.txt").write_text("three\n")
    (src / "nested").mkdir()
    (src / "nested" / "8_jackson_2.wav").write_bytes((FSDD_REC / "8_jackson_2.wav").read_bytes())
    (src / "nested" / "8_jackson_2.lab").write_text("eight")
    sf.write(src / "silence.wav", np.zeros(16000, np.float32), 16000)
    r = cli("data", "ingest", src, "--out", tmp_path / "out", "--max-seconds", 3)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert sorted((u.id, u.text) for u in rows) == [("3_george_0", "three"), ("5_lucas_1", ""), ("nested/8_jackson_2", "eight")]
    assert all(0.2 < u.duration < 1.5 and Path(u.audio).is_file() for u in rows)
    rejects = {Path(j["audio"]).stem: j for j in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())}
    assert {k: v["error"] for k, v in rejects.items()} == {**expected, "silence": "AudioSilent"}
    assert "0.010 s" in rejects["tiny"]["reason"] and "NaN" in rejects["nan"]["reason"] and "max_seconds=3" in rejects["too_long"]["reason"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["in"] == summary["out"] + summary["rejected"] == 10
    assert "10 in = 3 kept" in r.stdout


def test_ingest_csv_manifest_and_an_m4a_through_ffmpeg(tmp_path):
    from earful.data.ingest import ffmpeg_exe

    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "a.wav").write_bytes((FSDD_REC / "1_yweweler_4.wav").read_bytes())
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(FSDD_REC / "6_yweweler_4.wav"), "-c:a", "aac", str(clips / "b.m4a")], check=True)
    (tmp_path / "list.csv").write_text("audio,text\nclips/a.wav,one\nclips/b.m4a,six\n")
    write_manifest([Utterance(audio=str(FSDD_REC / "2_yweweler_4.wav"), text="two", id="m2", speaker="yweweler")], tmp_path / "m.jsonl")
    r = cli("data", "ingest", tmp_path / "list.csv", tmp_path / "m.jsonl", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {u.text: u for u in read_manifest(tmp_path / "out" / "manifest.jsonl")}
    assert set(rows) == {"one", "six", "two"}
    source_seconds = sf.info(FSDD_REC / "6_yweweler_4.wav").duration
    assert rows["six"].audio.endswith(".flac") and abs(rows["six"].duration - source_seconds) < 0.06  # converted, then measured
    assert rows["two"].speaker == "yweweler"


def test_ingest_a_parquet_dataset_through_datasets(tmp_path):
    from datasets import Audio, Dataset, Features, Value

    names = ["4_lucas_7.wav", "9_george_3.wav", "0_jackson_11.wav"]
    data = {"audio": [{"bytes": (FSDD_REC / n).read_bytes(), "path": n} for n in names], "sentence": ["four", "nine", "zero"]}
    # Built as raw {bytes, path} structs, then cast at the Arrow level: the Audio column the hub's
    # audio datasets have, without torchcodec (which datasets wants only to encode or decode).
    raw = Features({"audio": {"bytes": Value("binary"), "path": Value("string")}, "sentence": Value("string")})
    ds = Dataset.from_dict(data, features=raw).cast_column("audio", Audio(decode=False))
    assert isinstance(ds.features["audio"], Audio)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    # A second dataset of the same name elsewhere, with other clips: its rows must not overwrite the first's.
    (tmp_path / "other").mkdir()
    other = ["5_lucas_7.wav", "2_george_3.wav", "1_jackson_11.wav"]
    Dataset.from_dict({"audio": [{"bytes": (FSDD_REC / n).read_bytes(), "path": n} for n in other], "sentence": ["five", "two", "one"]},
                      features=raw).cast_column("audio", Audio(decode=False)).to_parquet(str(tmp_path / "other" / "train.parquet"))
    r = cli("data", "ingest", tmp_path / "train.parquet", tmp_path / "other" / "train.parquet", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [u.text for u in rows] == ["four", "nine", "zero", "five", "two", "one"]
    assert len({u.id for u in rows}) == 6
    for u, n in zip(rows, names + other):  # the dataset's bytes, written out unchanged
        assert Path(u.audio).read_bytes() == (FSDD_REC / n).read_bytes()


def test_ingest_urls_with_yt_dlp(tmp_path):
    url = (FSDD_REC / "7_george_9.wav").resolve().as_uri()
    # Another file of the same name (so the same extractor and id to yt-dlp), holding other speech.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "7_george_9.wav").write_bytes((FSDD_REC / "4_george_9.wav").read_bytes())
    (tmp_path / "urls.txt").write_text(f"# one a line\n{url}\n{(tmp_path / 'other' / '7_george_9.wav').as_uri()}\n")
    r = cli("data", "ingest", tmp_path / "urls.txt", "--out", tmp_path / "out", "--enable-file-urls")
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert Path(first.audio).read_bytes() == (FSDD_REC / "7_george_9.wav").read_bytes()
    assert Path(second.audio).read_bytes() == (FSDD_REC / "4_george_9.wav").read_bytes() and first.id != second.id
    # Without the opt-in, yt-dlp refuses file:// URLs: a reject with its reason, and the job goes on.
    r = cli("data", "ingest", url, FSDD_REC / "7_george_8.wav", "--out", tmp_path / "out2")
    assert r.returncode == 0, r.stderr[-2000:]
    [rej] = [json.loads(x) for x in (tmp_path / "out2" / "rejects.jsonl").read_text().splitlines()]
    assert rej["error"] == "FetchFailed" and "file" in rej["reason"].lower()
    assert len(read_manifest(tmp_path / "out2" / "manifest.jsonl")) == 1


def ffmpeg(*args) -> None:
    from earful.data.ingest import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *map(str, args)], check=True)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def test_ingest_files_of_one_name_from_different_folders_stay_apart(tmp_path):
    """a/x.m4a ("three") and b/x.m4a ("eight") once became one audio/x.flac, both rows pointing at
    "eight", with the id "x" twice. Each row must keep its own audio under its own id."""
    from earful.audio import load_audio

    spoken = {"a": "3_jackson_0", "b": "8_jackson_0", "c": "5_jackson_0", "d": "1_jackson_0"}
    for folder, clip in spoken.items():
        (tmp_path / folder).mkdir()
        ffmpeg("-i", FSDD_REC / f"{clip}.wav", "-c:a", "aac", tmp_path / folder / "x.m4a")
        (tmp_path / folder / "x.txt").write_text(clip)
    # The same name again from a manifest, twice (two questions about one clip are two rows).
    write_manifest([Utterance(audio=str(tmp_path / "d" / "x.m4a"), text=q, id="x") for q in ("one?", "again?")], tmp_path / "m.jsonl")
    umask = os.umask(0o022)
    try:
        r = cli("data", "ingest", tmp_path / "a", tmp_path / "b", tmp_path / "c" / "x.m4a", tmp_path / "m.jsonl", "--out", tmp_path / "out")
    finally:
        os.umask(umask)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [u.id for u in rows][:3] == ["a/x", "b/x", "c/x"]  # relative to the folder the sources share
    assert len({u.id for u in rows}) == len(rows) == 5 and all(u.id.startswith("x-") for u in rows[3:])
    assert len({u.audio for u in rows[:4]}) == 4 and rows[3].audio == rows[4].audio  # one file per source file
    for u in rows:
        clip = u.text if u.text in spoken.values() else spoken["d"]
        assert correlation(load_audio(u.audio), load_audio(FSDD_REC / f"{clip}.wav")) > 0.95, (u.id, u.audio)
        assert stat.S_IMODE(os.stat(u.audio).st_mode) == 0o644  # as open() makes files under umask 022
    assert all(stat.S_IMODE(os.stat(tmp_path / "out" / f).st_mode) == 0o644 for f in ("manifest.jsonl", "rejects.jsonl", "summary.json"))
    again = cli("data", "ingest", tmp_path / "a", tmp_path / "b", tmp_path / "c" / "x.m4a", tmp_path / "m.jsonl", "--out", tmp_path / "out2")
    assert again.returncode == 0 and [(u.id, Path(u.audio).name) for u in read_manifest(tmp_path / "out2" / "manifest.jsonl")] == \
        [(u.id, Path(u.audio).name) for u in rows]  # the same names on every run


def test_ingest_refuses_a_missing_source(tmp_path):
    r = cli("data", "ingest", tmp_path / "nope", "--out", tmp_path / "out")
    assert r.returncode == 2 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr


# -- segment --------------------------------------------------------------------------------------
def test_segment_fixed_by_stream_copy_keeps_every_sample(tmp_path):
    rec = long_recording(tmp_path / "long.wav")
    r = cli("data", "segment", rec, "--out", tmp_path / "seg", "--seconds", 10)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_manifest(tmp_path / "seg" / "manifest.jsonl")
    total = sf.info(rec).duration
    assert len(rows) == int(np.ceil(total / 10))
    assert all(abs(u.duration - 10) < 0.2 for u in rows[:-1])
    joined = np.concatenate([sf.read(u.audio, dtype="int16")[0] for u in rows])
    assert np.array_equal(joined, sf.read(rec, dtype="int16")[0])  # copied, not re-encoded: bit-exact


@pytest.mark.parametrize("by", ["fixed", "vad"])
def test_segment_recordings_of_one_name_stay_apart(tmp_path, by):
    """`segment a/x.wav b/x.wav` wrote both to x-00000, losing a's audio under a row that claimed it."""
    from numpy.lib.stride_tricks import sliding_window_view

    from earful.audio import load_audio

    for folder, speaker in (("a", "george"), ("b", "lucas")):
        (tmp_path / folder).mkdir()
        long_recording(tmp_path / folder / "x.wav", n=4, speaker=speaker)
    r = cli("data", "segment", tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav", "--out", tmp_path / "seg", "--by", by,
            "--seconds", 60, "--min-seconds", 0.2, "--max-seconds", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_manifest(tmp_path / "seg" / "manifest.jsonl")
    assert len({u.id for u in rows}) == len({u.audio for u in rows}) == len(rows) >= 2
    assert {u.id.rsplit("-", 1)[0] for u in rows} == {"a/x", "b/x"}
    for folder in ("a", "b"):
        mine = [u for u in rows if u.id.startswith(f"{folder}/x-")]
        if by == "fixed":  # one 60 s slice, copied: the recording itself
            assert len(mine) == 1
            assert np.array_equal(sf.read(mine[0].audio, dtype="int16")[0], sf.read(tmp_path / folder / "x.wav", dtype="int16")[0])
            continue
        # Each speech region is a stretch of this recording (at 16 kHz, as PCM 16), found by its loudest 64 samples.
        recording = load_audio(tmp_path / folder / "x.wav", 16000)
        assert len(mine) >= 2
        for u in mine:
            piece = sf.read(u.audio, dtype="float32")[0]
            peak = min(max(int(np.argmax(np.abs(piece))), 32), len(piece) - 32)
            hits = np.flatnonzero(np.abs(sliding_window_view(recording, 64) - piece[peak - 32 : peak + 32]).max(axis=1) < 1e-4)
            assert len(hits) == 1, (u.id, len(hits))
            start = hits[0] - (peak - 32)
            np.testing.assert_allclose(piece, recording[start : start + len(piece)], atol=1e-4)


def test_segment_by_voice_activity(tmp_path):
    rec = long_recording(tmp_path / "long.wav", n=20, gap=1.5)
    r = cli("data", "segment", rec, "--out", tmp_path / "seg", "--by", "vad", "--min-seconds", 0.3, "--max-seconds", 4)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_manifest(tmp_path / "seg" / "manifest.jsonl")
    assert 5 <= len(rows) <= 20
    assert all(0.3 <= u.duration <= 4.0 + 1e-6 for u in rows)
    speech = sum(u.duration for u in rows)
    assert speech < 0.6 * sf.info(rec).duration  # the silences are gone
    assert sf.info(rows[0].audio).samplerate == 16000


# -- encode ---------------------------------------------------------------------------------------
@pytest.fixture
def clips_manifest(tmp_path) -> Path:
    rows = [Utterance(audio=str(FSDD_REC / f"{d}_{s}_{i}.wav"), text=str(d), id=f"{d}_{s}_{i}")
            for s in ("george", "lucas") for d in range(10) for i in range(2)][:36]
    path = tmp_path / "m.jsonl"
    write_manifest(rows, path)
    return path


def store_files(root: Path) -> dict[str, tuple[dict, dict]]:
    """Every file under objects/ (a leftover temporary included): its safetensors metadata and tensors."""
    from safetensors import safe_open

    files = {}
    for p in sorted(p for p in (root / "objects").rglob("*") if p.is_file()):
        name = p.relative_to(root).as_posix()
        if p.name.startswith("."):  # a temporary: named, never read
            files[name] = ({}, {})
            continue
        with safe_open(p, framework="pt") as f:
            files[name] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    return files


def assert_same_store(a: dict, b: dict) -> None:
    """The same objects under the same keys, with the same metadata, shapes and dtypes; values equal
    to float rounding (the same batches are encoded, but MKL's sgemm may round differently from one
    process to the next), and the differing objects named, not dumped."""
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    differing = []
    for key in a:
        (meta_a, ta), (meta_b, tb) = a[key], b[key]
        assert meta_a == meta_b and sorted(ta) == sorted(tb), key
        for name in ta:
            assert ta[name].shape == tb[name].shape and ta[name].dtype == tb[name].dtype, key
            if not torch.equal(ta[name], tb[name]):
                differing.append((key, (ta[name].float() - tb[name].float()).abs().max().item()))
    assert all(d <= 1e-5 for _, d in differing), differing


def test_two_torchrun_processes_equal_one(clips_manifest, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = cli("data", "encode", "--data", clips_manifest, "--out", tmp_path / "one", "--encoder", "bundled:whisper-tiny.en",
              "--batch-size", 4, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "earful", "data", "encode", "--data", str(clips_manifest),
                          "--out", str(tmp_path / "two"), "--encoder", "bundled:whisper-tiny.en", "--batch-size", "4"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = store_files(tmp_path / "one"), store_files(tmp_path / "two")
    assert len(a) == 36
    assert_same_store(a, b)
    assert (tmp_path / "one" / "index.jsonl").read_text() == (tmp_path / "two" / "index.jsonl").read_text()
    parts = [json.loads(p.read_text()) for p in sorted((tmp_path / "two" / "parts").glob("*-of-00002.json"))]
    assert len(parts) == 2 and all(p["encoded"] > 0 for p in parts)  # both ranks worked
    assert sum(p["encoded"] for p in parts) == 36  # ... on disjoint shares
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["in"] == summary["out"] == 36

    # The stored encodings are the model's own encoder outputs, and the index finds them.
    from earful.data.shards import load_object, read_index

    import torch
    from transformers import AutoFeatureExtractor

    from earful.models.encoders import build_audio_encoder, load_encoder_weights
    from earful.models.processing import featurize
    from earful.pretrained import resolve
    from transformers import AutoConfig

    folder = resolve("bundled:whisper-tiny.en")
    config = AutoConfig.from_pretrained(folder)
    enc = build_audio_encoder(config)
    load_encoder_weights(enc, folder)
    row = read_index(tmp_path / "two")[5]
    from earful.audio import load_audio

    feats = featurize(AutoFeatureExtractor.from_pretrained(folder), config, [load_audio(row["audio"], 16000)])
    with torch.no_grad():
        hidden = enc(feats["input_features"], feats["input_features_mask"])[0].last_hidden_state[0]
    stored = load_object(tmp_path / "two", row["key"])
    assert stored.shape == hidden.shape == (row["frames"], 384)
    torch.testing.assert_close(stored, hidden, atol=1e-4, rtol=1e-4)


def test_encode_killed_midway_resumes_to_the_same_store(clips_manifest, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["data", "encode", "--data", clips_manifest, "--encoder", "bundled:whisper-tiny.en", "--batch-size", 2]
    straight = cli(*args, "--out", tmp_path / "straight", env=env)
    assert straight.returncode == 0, straight.stderr[-2000:]

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([PY, "-m", "earful", *map(str, args), "--out", str(crashed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((crashed / "objects").rglob("*.safetensors"))) < 8:
        assert proc.poll() is None, "finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len([p for p in (crashed / "objects").rglob("*.safetensors") if not p.name.startswith(".")])
    assert 8 <= done < 36 and not (crashed / "index.jsonl").exists()

    resumed = cli(*args, "--out", crashed, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["already_done"] >= 6 and summary["encoded"] + summary["already_done"] == 36
    assert_same_store(store_files(crashed), store_files(tmp_path / "straight"))  # none missing, none extra, no temporary left
    assert (crashed / "index.jsonl").read_text() == (tmp_path / "straight" / "index.jsonl").read_text()
    again = cli(*args, "--out", crashed, env=env)  # a third run has nothing to do
    assert json.loads((crashed / "summary.json").read_text())["encoded"] == 0, again.stderr[-1000:]

    # An object cut short (a full disk, a copy that stopped): the trainer's reader takes it as
    # missing, and a rerun logs it and encodes its batch again (batch size 2), whole.
    from earful.data.shards import find_objects, object_path, read_index

    index = read_index(crashed)
    victim = object_path(crashed, index[7]["key"])
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    identity = json.loads((crashed / "summary.json").read_text())["encoder_identity"]
    assert sorted(find_objects(crashed, identity, [r["audio"] for r in index])) == [i for i in range(36) if i != 7]
    repaired = cli(*args, "--out", crashed, env=env)
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert "unreadable encoded object" in repaired.stderr and victim.name in repaired.stderr
    summary = json.loads((crashed / "summary.json").read_text())
    assert (summary["encoded"], summary["already_done"]) == (2, 34)
    assert_same_store(store_files(crashed), store_files(tmp_path / "straight"))
    assert (crashed / "index.jsonl").read_text() == (tmp_path / "straight" / "index.jsonl").read_text()


def test_encode_records_each_bad_kind_and_goes_on(tmp_path):
    expected = bad_inputs(tmp_path / "bad")
    rows = [Utterance(audio=str(p), id=p.stem) for p in sorted((tmp_path / "bad").iterdir())]
    rows += [Utterance(audio=str(FSDD_REC / f"{d}_jackson_3.wav"), id=f"ok{d}") for d in range(4)]
    write_manifest(rows, tmp_path / "m.jsonl")
    r = cli("data", "encode", "--data", tmp_path / "m.jsonl", "--out", tmp_path / "store", "--encoder", "bundled:whisper-tiny.en",
            "--max-seconds", 3)
    assert r.returncode == 0, r.stderr[-2000:]
    rejects = {j["id"]: j for j in map(json.loads, (tmp_path / "store" / "rejects.jsonl").read_text().splitlines())}
    assert {k: v["error"] for k, v in rejects.items()} == expected
    assert all(v["reason"] for v in rejects.values())
    summary = json.loads((tmp_path / "store" / "summary.json").read_text())
    assert summary["in"] == 10 and summary["out"] == 4 and summary["rejected"] == 6


# -- synthesise -----------------------------------------------------------------------------------
def test_synth_speaks_lines_intelligibly_in_several_voices(tmp_path, whisper_dir):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from earful.audio import load_audio
    from earful.eval.asr import normalize

    lines = ["seven two nine", "the weather is nice today", "please call me tomorrow", "open the door"]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n\n")
    r = cli("data", "synth", "--text", tmp_path / "lines.txt", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [u.text for u in rows] == lines
    assert len({u.speaker for u in rows}) == 4 and all(sf.info(u.audio).samplerate == 16000 for u in rows)
    # Whisper tiny.en, untouched, understands what the voices say.
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    processor = WhisperProcessor.from_pretrained(whisper_dir)
    feats = processor([load_audio(u.audio) for u in rows], sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        heard = processor.batch_decode(model.generate(feats, max_new_tokens=20), skip_special_tokens=True)
    right = [normalize(h) == normalize(t) for h, t in zip(heard, lines)]
    assert sum(right) >= 3, list(zip(heard, lines))
    # A rerun keeps what was written.
    before = {u.audio: os.stat(u.audio).st_mtime_ns for u in rows}
    assert cli("data", "synth", "--text", tmp_path / "lines.txt", "--out", tmp_path / "out").returncode == 0
    assert {u.audio: os.stat(u.audio).st_mtime_ns for u in read_manifest(tmp_path / "out" / "manifest.jsonl")} == before


def test_synth_spoken_instructions(tmp_path):
    rows = [{"instruction": "Name a primary colour.", "output": "Red."}, {"question": "What is two plus two?", "answer": "Four."},
            {"prompt": "x" * 700, "response": "too long to speak"}]
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("data", "synth", "--instructions", tmp_path / "i.jsonl", "--out", tmp_path / "out", "--voices", "espeak:en-us,piper")
    assert r.returncode == 0, r.stderr[-2000:]
    got = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [(u.text, u.prompt, u.response) for u in got] == [("Name a primary colour.", "<|audio|>", "Red."),
                                                             ("What is two plus two?", "<|audio|>", "Four.")]
    [rej] = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert rej["line"] == 3 and "max-chars" in rej["reason"]
    bad = cli("data", "synth", "--text", tmp_path / "i.jsonl", "--instructions", tmp_path / "i.jsonl", "--out", tmp_path / "o2")
    assert bad.returncode == 2 and "exactly one" in bad.stderr


def test_encode_with_an_audio_tokenizer_stores_its_token_ids(tmp_path):
    """`earful data encode --encoder TOKENIZER_DIR`: the store holds each clip's unit ids, the same
    ids the tokenizer gives directly."""
    from earful.audio import load_audio
    from earful.data.shards import load_object, read_index
    from earful.tokenizers.base import load_audio_tokenizer

    rows = [Utterance(audio=str(FSDD_REC / f"{d}_lucas_0.wav"), id=f"{d}_lucas_0") for d in range(10)]
    write_manifest(rows, tmp_path / "m.jsonl")
    r = cli("units", "fit", "--data", tmp_path / "m.jsonl", "--k", "8", "--out", tmp_path / "u")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("data", "encode", "--data", tmp_path / "m.jsonl", "--encoder", tmp_path / "u", "--out", tmp_path / "store")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "store" / "summary.json").read_text())
    assert summary["kind"] == "ids" and summary["out"] == 10
    tok = load_audio_tokenizer(tmp_path / "u")
    row = read_index(tmp_path / "store")[3]
    ids = load_object(tmp_path / "store", row["key"])
    assert ids.tolist() == tok.encode(load_audio(row["audio"], tok.sampling_rate)) and ids.max() < 8
