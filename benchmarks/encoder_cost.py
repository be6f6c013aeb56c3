""".venv/bin/python benchmarks/encoder_cost.py --clips 200

What Whisper's 30 s padding costs on short clips: tiny.en's encoder on real FSDD digits, run
(a) as earful's `WhisperShortEncoder` on each clip's own frames (`padding="longest"`), and
(b) as transformers' `WhisperEncoder` on features padded to 30 s (3000 mel frames),
with the same weights, in the same process, fp32, under `torch.no_grad`.

Timing. Clips are a seeded sample of FSDD, sorted by length and cut into batches of 16 (length
grouping, as training does). (a) runs every clip; (b) costs ~1 s a clip on two CPU cores, so it
runs only `--padded-clips` of them: whole batches spread evenly over the length order. Speedups
compare the two on exactly those clips, and the calls are interleaved batch by batch (the order
flips each batch), so a busy machine slows both alike. Batch size 1 feeds the same clips one at a
time. Encoder time excludes feature extraction, which is timed separately for each variant. Run it on
an idle CPU: when another process holds a core, torch's default of one OpenMP thread per core
stalls on every op, which inflates the short encoder's many tiny ops ~40x and the padded one's
large ops far less, so the speedup collapses (pass `--threads 1` if the machine cannot be idle).

Memory. tracemalloc cannot see torch's allocations, so each (variant, batch size) runs in a fresh
spawned process: load the encoder and features, reset the kernel's peak-RSS mark
(`echo 5 > /proc/self/clear_refs`, Linux only), run one forward, and record peak RSS (VmHWM)
minus RSS before it; then do it again. The first ("cold") call also pays one-time setup (thread
pools, kernel caches, ~13 MiB); the second ("warm") is the working memory of a forward pass, and
`memory_ratio` is warm, batch 16. glibc's mmap threshold is fixed in the child so freed tensor
buffers leave RSS rather than being silently reused by the second call. Batch 16 uses the longest
batch; batch 1 the longest clip. Weights and features are excluded (loaded before the reset). With CUDA present, CUDA time and
`torch.cuda.max_memory_allocated` are reported too; the CPU figures are always measured.

Output agreement: on a few clips, the largest |(a) - (b)[:, :T']| over the real frames. It is not
zero: (b)'s frames also attend to the 30 s of padding.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from reporting import footer, write_report

SAMPLING_RATE = 16000
BATCH = 16
AGREEMENT_CLIPS = 5
MODEL_SPEC = "bundled:whisper-tiny.en"
MMAP_THRESHOLD = 64 * 1024  # bytes; see memory_in_fresh_process


# -- data --------------------------------------------------------------------------------------
def fsdd_dir() -> Path:
    from earful.data.fsdd import default_fsdd_dir

    folder = default_fsdd_dir()
    if not (folder / "recordings").is_dir() or not any((folder / "recordings").glob("*.wav")):
        sys.exit(f"FSDD not found: expected {folder}/recordings/*.wav; set EARFUL_FSDD to the folder that holds recordings/")
    return folder


def load_clips(n: int, seed: int) -> tuple[list[str], list[np.ndarray]]:
    from earful.audio import load_audio

    paths = sorted((fsdd_dir() / "recordings").glob("*.wav"))
    if n > len(paths):
        sys.exit(f"--clips {n} asks for more clips than FSDD holds ({len(paths)})")
    paths = random.Random(seed).sample(paths, n)
    return [p.name for p in paths], [load_audio(p, SAMPLING_RATE) for p in paths]


# -- features ----------------------------------------------------------------------------------
def short_features(extractor, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each clip's own frames, zero-padded to the batch's longest, as `SpeechLMProcessor.featurize`."""
    feats = [extractor(w, sampling_rate=SAMPLING_RATE, padding="longest", return_tensors="np")["input_features"][0] for w in waves]
    T = max(f.shape[-1] for f in feats)
    batch = np.zeros((len(feats), feats[0].shape[0], T), dtype=np.float32)  # (B, F, T)
    mask = np.zeros((len(feats), T), dtype=np.int64)  # (B, T)
    for i, f in enumerate(feats):
        batch[i, :, : f.shape[-1]] = f
        mask[i, : f.shape[-1]] = 1
    return torch.from_numpy(batch), torch.from_numpy(mask)


def padded_features(extractor, waves: list[np.ndarray]) -> torch.Tensor:
    """transformers' default: every clip padded to 30 s, (B, F, 3000)."""
    return extractor(waves, sampling_rate=SAMPLING_RATE, return_tensors="pt")["input_features"]


# -- models ------------------------------------------------------------------------------------
def load_encoders(folder: str):
    from transformers import WhisperModel

    from earful.models.encoders import WhisperShortEncoder

    padded = WhisperModel.from_pretrained(folder).get_encoder().eval()
    short = WhisperShortEncoder(padded.config).eval()
    short.load_state_dict(padded.state_dict(), strict=True)
    return short, padded


def run_short(enc, feats):
    out, _ = enc(*feats)
    return out.last_hidden_state


def run_padded(enc, feats):
    return enc(feats).last_hidden_state


# -- memory (child process) --------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure_memory(folder: str, variant: str, waves: list[np.ndarray]) -> dict:
    """Run in a fresh process: peak RSS increase of one forward pass, in MiB."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    enc, run = (load_encoders(folder)[0], run_short) if variant == "short" else (load_encoders(folder)[1], run_padded)
    feats = short_features(extractor, waves) if variant == "short" else padded_features(extractor, waves)
    if not os.access("/proc/self/clear_refs", os.W_OK):
        sys.exit("memory needs Linux's /proc/self/clear_refs to reset the peak-RSS mark; not writable here")
    peaks = {}
    with torch.no_grad():
        for call in ("cold", "warm"):  # cold includes one-time setup (thread pools, kernel caches)
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            before = _rss_kb("VmRSS")
            run(enc, feats)
            peaks[f"{call}_peak_increase_mib"] = (_rss_kb("VmHWM") - before) / 1024
    return peaks


def memory_in_fresh_process(folder: str, variant: str, waves: list[np.ndarray]) -> dict:
    # A fixed mmap threshold turns off glibc's adaptive one, so large tensor buffers go back to the
    # OS when freed instead of staying resident in the heap, where a second call would reuse them
    # without raising RSS. The child reads it at start-up; spawn passes it via the environment.
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(measure_memory, folder, variant, waves).result()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


# -- timing ------------------------------------------------------------------------------------
def timed(fn, *args, sync=lambda: None) -> tuple[object, float]:
    sync()
    start = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - start


def time_interleaved(batches, short, padded, extractor, device, sync) -> dict:
    """Feature and encoder seconds for both variants over the same batches, order flipped each batch."""
    secs = {"short_features": 0.0, "padded_features": 0.0, "short_encoder": 0.0, "padded_encoder": 0.0}
    for i, waves in enumerate(batches):
        order = ("short", "padded") if i % 2 == 0 else ("padded", "short")
        for variant in order:
            if variant == "short":
                feats, t_feat = timed(short_features, extractor, waves)
                feats = tuple(f.to(device) for f in feats)
                _, t_enc = timed(run_short, short, feats, sync=sync)
            else:
                feats, t_feat = timed(padded_features, extractor, waves)
                _, t_enc = timed(run_padded, padded, feats.to(device), sync=sync)
            secs[f"{variant}_features"] += t_feat
            secs[f"{variant}_encoder"] += t_enc
    return secs


def time_short_only(batches, short, extractor, device, sync) -> dict:
    secs = {"short_features": 0.0, "short_encoder": 0.0}
    for waves in batches:
        feats, t_feat = timed(short_features, extractor, waves)
        _, t_enc = timed(run_short, short, tuple(f.to(device) for f in feats), sync=sync)
        secs["short_features"] += t_feat
        secs["short_encoder"] += t_enc
    return secs


def bench_device(device, batches_by_size, short, padded, extractor) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    short, padded = short.to(device), padded.to(device)
    report = {}
    with torch.no_grad():
        warm = batches_by_size[1]["shared"][0]
        run_short(short, tuple(f.to(device) for f in short_features(extractor, warm)))
        run_padded(padded, padded_features(extractor, warm).to(device))
        for size, sets in batches_by_size.items():
            shared = time_interleaved(sets["shared"], short, padded, extractor, device, sync)
            everything = time_short_only(sets["all"], short, extractor, device, sync)
            n_shared = sum(len(b) for b in sets["shared"])
            n_all = sum(len(b) for b in sets["all"])
            report[f"batch{size}"] = {
                "shared_clips": n_shared,
                "seconds_on_shared_clips": shared,
                "ms_per_clip_on_shared_clips": {k: 1000 * v / n_shared for k, v in shared.items()},
                "short_ms_per_clip_on_all_clips": {k: 1000 * v / n_all for k, v in everything.items()},
                "speedup": shared["padded_encoder"] / shared["short_encoder"],
            }
    if device.type == "cuda":
        longest = batches_by_size[BATCH]["all"][-1]
        short_feats = tuple(f.to(device) for f in short_features(extractor, longest))
        padded_feats = padded_features(extractor, longest).to(device)
        for variant, call in (("short", lambda: run_short(short, short_feats)), ("padded", lambda: run_padded(padded, padded_feats))):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.no_grad():
                call()
            report[f"cuda_peak_increase_mib_batch{BATCH}_{variant}"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    short.cpu(), padded.cpu()
    return report


# -- main --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=200, help="FSDD clips for the short encoder")
    parser.add_argument("--padded-clips", type=int, default=48, help="of those, clips also run padded (whole batches of 16)")
    parser.add_argument("--seed", type=int, default=0, help="which FSDD clips are sampled")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoder_cost.json"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own). On a CPU busy with other work, fewer threads "
                             "than cores avoids OpenMP stalls that inflate small ops ~40x")
    args = parser.parse_args()
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import WhisperFeatureExtractor

    from earful.pretrained import resolve

    folder = resolve(MODEL_SPEC)
    names, waves = load_clips(args.clips, args.seed)
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    short, padded = load_encoders(folder)

    # Length-grouped batches of 16, any short batch first, holding the shortest clips; (b) runs on
    # whole full batches spread evenly over the length order.
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    rest = len(order) % BATCH
    groups = ([order[:rest]] if rest else []) + [order[i : i + BATCH] for i in range(rest, len(order), BATCH)]
    full = [g for g in groups if len(g) == BATCH] or groups
    n_shared = max(1, min(len(full), round(args.padded_clips / BATCH)))
    shared_groups = [full[j] for j in sorted({round(j * (len(full) - 1) / max(1, n_shared - 1)) for j in range(n_shared)})]
    shared_ids = [i for g in shared_groups for i in g]
    batches_by_size = {
        1: {"all": [[waves[i]] for i in order], "shared": [[waves[i]] for i in shared_ids]},
        BATCH: {"all": [[waves[i] for i in g] for g in groups], "shared": [[waves[i] for i in g] for g in shared_groups]},
    }

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    timing = {d.type: bench_device(d, batches_by_size, short, padded, extractor) for d in devices}

    # Agreement: (a) alone vs the first T' frames of (b), on a few clips.
    agreement = []
    with torch.no_grad():
        for i in shared_ids[:: max(1, len(shared_ids) // AGREEMENT_CLIPS)][:AGREEMENT_CLIPS]:
            a = run_short(short, short_features(extractor, [waves[i]]))[0]  # (T', C)
            b = run_padded(padded, padded_features(extractor, [waves[i]]))[0, : a.shape[0]]  # (T', C)
            agreement.append({"clip": names[i], "frames": a.shape[0], "max_abs_diff": float((a - b).abs().max()),
                              "max_abs_value": float(b.abs().max())})

    memory = {}
    for size, ids in ((1, [order[-1]]), (BATCH, groups[-1])):
        for variant in ("short", "padded"):
            memory[f"batch{size}_{variant}"] = memory_in_fresh_process(folder, variant, [waves[i] for i in ids])
    memory_ratio = {f"{call}_batch{size}": memory[f"batch{size}_padded"][f"{call}_peak_increase_mib"]
                    / memory[f"batch{size}_short"][f"{call}_peak_increase_mib"]
                    for call in ("warm", "cold") for size in (1, BATCH)}

    cpu = timing["cpu"]
    result = {
        "speedup_batch1": cpu["batch1"]["speedup"],
        f"speedup_batch{BATCH}": cpu[f"batch{BATCH}"]["speedup"],
        "memory_ratio": memory_ratio[f"warm_batch{BATCH}"],
        "details": {
            "model": MODEL_SPEC,
            "clips": args.clips,
            "padded_clips": len(shared_ids),
            "seed": args.seed,
            "mean_clip_seconds": float(np.mean([len(w) for w in waves]) / SAMPLING_RATE),
            "mean_clip_seconds_padded_subset": float(np.mean([len(waves[i]) for i in shared_ids]) / SAMPLING_RATE),
            "timing": timing,
            "memory_mib": memory,
            "memory_ratios": memory_ratio,
            "memory_method": "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before one forward pass, "
                             f"fresh spawned process per variant, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; "
                             "cold = first call, warm = second call",
            "agreement": agreement,
            "load_average_at_start": load_at_start,
        },
        **footer(started),
    }
    write_report(args.out, result)

    print(f"Whisper tiny.en encoder, {args.clips} FSDD clips (mean {result['details']['mean_clip_seconds']:.2f} s), "
          f"{len(shared_ids)} also padded to 30 s; CPU, {torch.get_num_threads()} threads")
    print(f"{'':>9} {'short ms/clip':>14} {'padded ms/clip':>15} {'speedup':>8} {'feat short':>11} {'feat padded':>12}")
    for size in (1, BATCH):
        ms = cpu[f"batch{size}"]["ms_per_clip_on_shared_clips"]
        print(f"{'batch ' + str(size):>9} {ms['short_encoder']:>14.2f} {ms['padded_encoder']:>15.1f} "
              f"{cpu[f'batch{size}']['speedup']:>7.1f}x {ms['short_features']:>11.2f} {ms['padded_features']:>12.2f}")
    for size in (1, BATCH):
        s, p = memory[f"batch{size}_short"]["warm_peak_increase_mib"], memory[f"batch{size}_padded"]["warm_peak_increase_mib"]
        print(f"peak RSS increase of a forward, batch {size}: short {s:.1f} MiB, padded {p:.1f} MiB "
              f"({memory_ratio[f'warm_batch{size}']:.1f}x)")
    if load_at_start[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load_at_start[0]:.1f} on {os.cpu_count()} cores at start; other work skews these timings")
    print(f"max |short - padded[:T']| on {len(agreement)} clips: {max(a['max_abs_diff'] for a in agreement):.3g}")
    print(f"wrote {args.out} in {result['runtime_seconds']:.0f} s")


if __name__ == "__main__":
    main()
