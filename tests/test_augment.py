"""data.augment: each augmentation changes real FSDD speech as it claims, every draw is a function
of (seed, epoch, clip), the recipe refuses what it cannot run, and training hears a new draw each
epoch, through the encoder cache too (pre-rendered copies).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fsdd_clip
from earful.audio import find_ffmpeg
from earful.data import augment as A
from earful.data.augment import AugmentSpec, Augmenter, parse_augment
from earful.train.recipe import RecipeError, build_recipe, load_recipe

from test_train import manifests, recipe_args, tiny_parts  # noqa: F401 (fixtures)

SR = 16000
CLIPS = ("3_jackson_7.wav", "8_lucas_2.wav", "0_george_4.wav", "6_nicolas_1.wav", "1_yweweler_3.wav", "5_jackson_0.wav")
DIGITS = Path(__file__).parents[1] / "recipes" / "digits.yaml"


@pytest.fixture(scope="module")
def clips(fsdd) -> list[np.ndarray]:
    return [fsdd_clip(c) for c in CLIPS]


def augmenter(clips, seed=0, **augment) -> Augmenter:
    spec, problems = parse_augment(augment)
    assert not problems, problems
    return Augmenter(spec, SR, seed, clips=lambda j: clips[j], n_clips=len(clips))


def psd(wave: np.ndarray, n: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Welch's power spectrum (Hann windows, half overlap): frequencies (Hz), power."""
    segments = [wave[i : i + n] * np.hanning(n) for i in range(0, len(wave) - n, n // 2)]
    return np.fft.rfftfreq(n, 1 / SR), np.mean([np.abs(np.fft.rfft(s)) ** 2 for s in segments], 0)


def share(f, p, lo, hi) -> float:
    return float(p[(f >= lo) & (f < hi)].sum() / p.sum())


def broadband(clip: np.ndarray) -> np.ndarray:
    """An FSDD clip (recorded at 8 kHz: nothing above 4 kHz) with white noise at 10 dB SNR, so the
    whole 0-8 kHz band holds something for a band limit to take away."""
    return A.add_noise(clip, A.colored_noise(len(clip), "white", np.random.default_rng(1)), 10.0)


# -- each augmentation does what it says ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["white", "pink", "brown", "hum", "babble"])
def test_noise_is_added_at_the_drawn_snr(clips, kind):
    aug = augmenter(clips, noise={"p": 1.0, "snr_db": [0, 30], "kinds": [kind]})
    for index in range(3):
        clean = clips[index]
        [(name, drawn)] = aug.plan(index, draw=0)
        assert name == "noise" and drawn["kind"] == kind and 0 <= drawn["snr_db"] <= 30
        noisy = aug(clean, index, draw=0)
        assert len(noisy) == len(clean)
        assert A.snr_db(clean, noisy - clean) == pytest.approx(drawn["snr_db"], abs=0.5)
        if kind == "babble":
            assert 3 <= len(drawn["talkers"]) <= 5 and index not in drawn["talkers"]


@pytest.mark.parametrize("kind, slope", [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_coloured_noise_has_its_spectral_slope(kind, slope):
    """Power ~ f^slope: white flat, pink -3 dB per octave, brown -6 dB per octave (100 Hz - 4 kHz)."""
    f, p = psd(A.colored_noise(4 * SR, kind, np.random.default_rng(0)))
    band = (f >= 100) & (f <= 4000)
    assert np.polyfit(np.log10(f[band]), np.log10(p[band]), 1)[0] == pytest.approx(slope, abs=0.1)


def test_hum_is_mains_frequency_and_its_harmonics():
    f, p = psd(A.hum(2 * SR, SR, np.random.default_rng(3)), n=8192)
    peak = f[np.argmax(p)]
    assert peak == pytest.approx(50, abs=2) or peak == pytest.approx(60, abs=2)
    harmonics = sum(p[np.abs(f - k * round(peak, -1)) < 4].sum() for k in range(1, 9))
    assert harmonics / p.sum() > 0.99


def test_telephone_band_keeps_300_to_3400_hz(clips):
    wide = broadband(clips[0])
    f, before = psd(wide)
    _, after = psd(A.band_limit(wide, SR, "telephone"))
    total = before.sum()
    assert before[f < 250].sum() / total > 0.01 and before[f > 3500].sum() / total > 0.01
    assert after[f < 250].sum() / total < 1e-4 and after[f > 3500].sum() / total < 1e-4
    mid = (f > 500) & (f < 3000)
    assert after[mid].sum() / before[mid].sum() == pytest.approx(1.0, abs=0.01)


def test_8k_round_trip_removes_content_above_4_khz(clips):
    wide = broadband(clips[1])
    narrow = A.band_limit(wide, SR, "8k")
    assert len(narrow) == len(wide)
    f, before = psd(wide)
    _, after = psd(narrow)
    assert share(f, before, 4100, 8000) > 0.02
    assert after[f > 4100].sum() / before[f > 4100].sum() < 1e-3
    mid = (f > 300) & (f < 3500)
    assert after[mid].sum() / before[mid].sum() == pytest.approx(1.0, abs=0.02)


def test_eq_tilts_the_spectrum_rolls_off_both_ends_and_keeps_the_level(clips):
    wide = broadband(clips[3])
    f, before = psd(wide)
    bright = A.equalize(wide, SR, tilt_db=6.0, highpass_hz=0.0, lowpass_hz=48000.0)
    _, after = psd(bright)
    assert A.power(bright) == pytest.approx(A.power(wide), rel=1e-3)  # the level is kept
    # +6 dB per octave: 2 kHz vs 500 Hz is two octaves, 12 dB more (before the level is restored).
    ratio = lambda p, hz: p[np.argmin(abs(f - hz))]  # noqa: E731
    gained = 10 * np.log10((ratio(after, 2000) / ratio(after, 500)) / (ratio(before, 2000) / ratio(before, 500)))
    assert gained == pytest.approx(12.0, abs=0.5)
    rolled = A.equalize(wide, SR, tilt_db=0.0, highpass_hz=400.0, lowpass_hz=2000.0)
    _, cut = psd(rolled)
    low, high, mid = f < 150, f > 5000, (f > 800) & (f < 1200)
    assert cut[low].sum() / cut[mid].sum() < 0.05 * before[low].sum() / before[mid].sum()
    assert cut[high].sum() / cut[mid].sum() < 0.05 * before[high].sum() / before[mid].sum()
    aug = augmenter(clips, eq={"p": 1.0})
    assert np.array_equal(aug(clips[0], 0, draw=1), aug(clips[0], 0, draw=1)) and not np.array_equal(aug(clips[0], 0, 1), aug(clips[0], 0, 2))


def test_gain_changes_the_level_by_its_db(clips):
    aug = augmenter(clips, gain={"p": 1.0, "db": [-12, 6]})
    [(_, drawn)] = aug.plan(2, draw=5)
    louder = aug(clips[2], 2, draw=5)
    assert 10 * math.log10(A.power(louder) / A.power(clips[2])) == pytest.approx(drawn["db"], abs=1e-3)


def test_speed_changes_the_length_by_its_factor(clips):
    aug = augmenter(clips, speed={"p": 1.0, "factors": [0.85, 1.15]})
    for index, clip in enumerate(clips):
        [(_, drawn)] = aug.plan(index, draw=0)
        assert len(aug(clip, index, draw=0)) == pytest.approx(len(clip) / drawn["factor"], abs=2)
    factors = [aug.plan(index, draw=0)[0][1]["factor"] for index in range(40)]
    assert 0.85 <= min(factors) < 0.9 and 1.1 < max(factors) <= 1.15  # drawn from the whole range
    # A speed change the encoder would refuse (too long for it) is skipped, not cut.
    slow = Augmenter(parse_augment({"speed": {"p": 1.0, "factors": 0.5}})[0], SR, 0, length_ok=lambda n: n < 1.5 * len(clips[0]))
    assert np.array_equal(slow(clips[0], 0, 0), clips[0])


@pytest.mark.skipif(find_ffmpeg() is None, reason="ffmpeg (imageio-ffmpeg, earful[ingest]) is not installed")
@pytest.mark.parametrize("kind", ["mp3", "opus"])
def test_codec_round_trip_keeps_the_length_and_loses_detail(clips, kind, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.chdir(tmp_path)  # pipes only: no file here, and none in the temp folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    clip = clips[0]
    low, high = (A.codec_round_trip(clip, SR, kind, kbps, find_ffmpeg()) for kbps in (8, 24))
    assert len(low) == len(high) == len(clip)
    error = [A.power(y - clip) / A.power(clip) for y in (low, high)]
    assert error[0] > error[1] > 1e-4  # changed, and more at 8 kbit/s than at 24
    assert np.corrcoef(clip, high)[0, 1] > 0.98  # aligned in time: the encoder's delay is taken out
    assert not list(tmp_path.iterdir())


def test_reverb_impulse_response_decays_60_db_in_rt60():
    rir = A.room_impulse_response(SR, 0.6, 3.0, np.random.default_rng(0))
    tail = rir[1:]
    assert 10 * math.log10(1 / np.sum(tail**2)) == pytest.approx(3.0, abs=1e-3)  # direct-to-reverberant ratio
    schroeder = np.cumsum(tail[::-1] ** 2)[::-1]  # energy still to come, after each sample
    level = 10 * np.log10(schroeder / schroeder[0])
    fit = (level < -5) & (level > -25)
    t = np.arange(len(level)) / SR
    assert -60 / np.polyfit(t[fit], level[fit], 1)[0] == pytest.approx(0.6, rel=0.05)


def test_reverb_lengthens_the_decay_after_the_speech(clips):
    clip = np.concatenate([clips[0], np.zeros(SR // 2, np.float32)])  # half a second of silence after the digit
    aug = augmenter(clips, reverb={"p": 1.0, "rt60": [0.5, 0.8], "drr_db": [0, 0]})
    wet = aug(clip, 0, draw=0)
    assert len(wet) == len(clip) and A.power(wet) == pytest.approx(A.power(clip), rel=1e-4)
    after = slice(len(clips[0]) + SR // 20, len(clips[0]) + SR // 5)  # 50-200 ms after the end of the recording
    assert A.power(clip[after]) == 0 and A.power(wet[after]) > 1e-3 * A.power(wet)


# -- reproducible draws ---------------------------------------------------------------------------

EVERYTHING = {"noise": {"p": 1.0, "kinds": ["white", "pink", "brown", "babble", "hum"]}, "gain": {"p": 0.7},
              "speed": {"p": 0.7}, "band": {"p": 0.5}, "reverb": {"p": 0.5}}


def test_the_draw_is_a_function_of_seed_epoch_and_clip(clips):
    aug = augmenter(clips, **EVERYTHING)
    same = augmenter(clips, **EVERYTHING)
    for index in range(len(clips)):
        assert np.array_equal(aug(clips[index], index, 3), same(clips[index], index, 3))
    plans = [aug.plan(i, e) for i in range(len(clips)) for e in range(4)]
    assert len({repr(p) for p in plans}) == len(plans)  # every (clip, epoch) draws anew
    assert aug.plan(0, 0) != augmenter(clips, seed=1, **EVERYTHING).plan(0, 0)
    # Each augmentation has its own random stream: another gain range leaves the noise as drawn.
    other = augmenter(clips, **{**EVERYTHING, "gain": {"p": 0.7, "db": [0, 1]}})
    for i in range(len(clips)):
        assert [s for s in aug.plan(i, 0) if s[0] == "noise"] == [s for s in other.plan(i, 0) if s[0] == "noise"]


def test_pre_rendered_copies_are_each_heard_once_in_k_epochs():
    aug = Augmenter(parse_augment({"copies": 4, "gain": {"p": 1.0}})[0], SR, 0)
    for index in range(20):
        assert sorted(aug.copy_of(index, e) for e in range(4)) == [0, 1, 2, 3]
        assert aug.copy_of(index, 1) == aug.copy_of(index, 5)
    assert len({aug.copy_of(i, 0) for i in range(20)}) > 1  # the clips do not march in step


def test_specaugment_masks_the_stated_bands():
    spec = parse_augment({"specaugment": {"p": 1.0, "time_masks": 2, "time_width": 0.1, "freq_masks": 3, "freq_width": 8}})[0]
    aug = Augmenter(spec, SR, 0)
    feats = torch.randn(80, 120)  # (F, T): a clip's log-mel frames, 100 real and 20 of padding
    for index in range(10):
        masked = aug.mask(feats, index, draw=0, time_axis=-1, n_valid=100)
        changed = masked != feats
        frames, bins = changed.all(0), changed.all(1)  # frames masked in every bin, bins masked in every frame
        assert not frames[100:].any()  # padding is never a time mask
        for bands, n_masks, width in ((frames, 2, 10), (bins, 3, 8)):  # 10: 0.1 of 100 frames
            assert 1 <= len(_runs(bands)) <= n_masks  # masks may overlap, and then make one band
            assert 1 <= bands.sum() <= n_masks * width
        assert changed.sum() == frames.sum() * 80 + bins.sum() * 120 - frames.sum() * bins.sum()  # nothing else changed
        fill = masked[changed]
        assert torch.allclose(fill, fill[0].expand_as(fill))  # one fill value: the clip's mean
        assert fill[0] == pytest.approx(float(feats[:, :100].mean()), abs=1e-6)
    assert torch.equal(aug.mask(feats, 0, 0, -1, 100), aug.mask(feats, 0, 0, -1, 100))
    assert not torch.equal(aug.mask(feats, 0, 0, -1, 100), aug.mask(feats, 0, 1, -1, 100))


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, on in enumerate([*flags.tolist(), False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


# -- the recipe ------------------------------------------------------------------------------------

BASE = {"data": {"train": "t.jsonl"}, "model": {"lora": "encoder"}}


@pytest.mark.parametrize("augment, says", [
    ({"noise": {"p": 1.5}}, "data.augment.noise.p: expected a probability within [0, 1], found 1.5"),
    ({"noise": {"snr_db": [30, 5]}}, "data.augment.noise.snr_db: expected [low, high]"),
    ({"noise": {"kinds": ["pink", "purple"]}}, "data.augment.noise.kinds: expected a non-empty list of white, pink, brown, babble, hum, found ['pink', 'purple']"),
    ({"noise": {"snr": 10}}, "data.augment.noise.snr: unknown key (known: p, snr_db, kinds)"),
    ({"echo": {"p": 0.5}}, "data.augment.echo: unknown key (known: copies, speed, reverb, noise, eq, band, codec, gain, specaugment)"),
    ({"gain": {"db": "loud"}}, "data.augment.gain.db: expected [low, high] (numbers, low <= high, within [-60, 40]) or one number, found 'loud'"),
    ({"speed": {"factors": [0.3, 1.1]}}, "data.augment.speed.factors: expected [low, high] (numbers, low <= high, within [0.5, 2])"),
    ({"band": {"kinds": []}}, "data.augment.band.kinds: expected a non-empty list of telephone, 8k, found []"),
    ({"codec": {"kbps": [8.5, 24]}}, "data.augment.codec.kbps: expected [low, high] (whole numbers"),
    ({"reverb": {"rt60": [0.2, 9]}}, "data.augment.reverb.rt60: expected [low, high]"),
    ({"specaugment": {"time_width": 0.5, "freq_masks": -1}}, "data.augment.specaugment.freq_masks: expected a whole number >= 0, found -1"),
    ({"specaugment": {"freq_width": 2.5}}, "data.augment.specaugment.freq_width: expected a whole number of mel bins >= 1, found 2.5"),
    ({"noise": 0.5}, "data.augment.noise: expected a mapping of its settings (p, snr_db, kinds) or null (off), found 0.5"),
    ({"copies": 0, "gain": {}}, "data.augment.copies: expected a whole number within [1, 64] (or null), found 0"),
    ({"copies": 3, "specaugment": {}}, "data.augment.copies: 3 copies, but no wave augmentation is on"),
])
def test_recipe_refuses_bad_augment_settings(augment, says):
    with pytest.raises(RecipeError) as e:
        build_recipe({**BASE, "data": {**BASE["data"], "augment": augment}})
    assert says in str(e.value)


@pytest.mark.parametrize("extra, says", [
    ({"model": {"lora": None}}, "data.augment: the frozen encoder's outputs are computed once and cached, so noise would be drawn "
                                "once for the whole run; set data.augment.copies: K"),
    ({"train": {"objective": "dpo"}}, "data.augment: DPO's reference log-probs are computed once, on clean audio"),
])
def test_recipe_refuses_augmentation_it_cannot_honour(extra, says):
    raw = {**BASE, **extra, "data": {"train": "t.jsonl", "augment": {"noise": {"p": 0.5}}}}
    with pytest.raises(RecipeError) as e:
        build_recipe(raw)
    assert says in str(e.value)


def test_every_augment_setting_is_a_recipe_key():
    """The issue's example section, from --set as from YAML; an absent section is no augmentation."""
    sets = ["data.train=t.jsonl", "model.lora=encoder", "data.augment.noise={p: 0.5, snr_db: [5, 30], kinds: [white, pink, brown, babble, hum]}",
            "data.augment.gain={p: 0.5, db: [-12, 6]}", "data.augment.speed={p: 0.5, factors: [0.85, 1.15]}",
            "data.augment.band={p: 0.2, kinds: [telephone, 8k]}", "data.augment.codec={p: 0.1, kinds: [mp3, opus], kbps: [8, 24]}",
            "data.augment.reverb={p: 0.2, rt60: [0.2, 0.8]}",
            "data.augment.specaugment={p: 1.0, time_masks: 2, time_width: 0.05, freq_masks: 2, freq_width: 8}"]
    recipe = load_recipe(DIGITS, sets)
    spec, problems = parse_augment(recipe.data.augment)
    assert not problems and list(spec.waves) == ["speed", "reverb", "noise", "band", "codec", "gain"] and spec.masks.freq_width == 8
    assert spec.speed.factors == [0.85, 1.15] and spec.codec.kbps == [8.0, 24.0]
    assert not parse_augment(load_recipe(DIGITS, ["data.train=t.jsonl"]).data.augment)[0].active
    assert not parse_augment(None)[0].active and parse_augment(None)[0] == AugmentSpec()


def test_a_codec_without_ffmpeg_is_refused_at_recipe_time(monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as where earful[ingest] is not installed
    with pytest.raises(RecipeError, match=r"data\.augment\.codec: MP3/Opus round trips need ffmpeg.*pip install 'earful\[ingest\]'"):
        build_recipe({**BASE, "data": {"train": "t.jsonl", "augment": {"codec": {"p": 0.1}}}})
    with pytest.raises(A.AugmentError, match="need ffmpeg"):
        Augmenter(parse_augment({"codec": {"p": 0.1}})[0], SR, 0)


# -- training --------------------------------------------------------------------------------------

def _recipe(tiny_parts, manifests, *sets, **train):
    args = recipe_args(tiny_parts, manifests, **{"max_steps": 2, "eval_every": 0, "save_every": 0, "log_every": 1, **train})[1:]
    return load_recipe(DIGITS, [*map(str, args), *sets])


def test_encoder_lora_training_hears_new_augmented_audio_each_epoch_and_clean_eval(tiny_parts, manifests, tmp_path, monkeypatch):
    """The shipped recipe's layout (encoder LoRA: the encoder runs every step): the train batcher
    gives the same features for the same epoch (so --resume hears the same audio) and others in
    another; eval features are the clean clips'; a short training runs with every augmentation."""
    from earful.train import trainer
    from earful.train.listening import listening_parts

    codec = ["data.augment.codec={p: 0.3, kbps: [8, 16]}"] if find_ffmpeg() else []
    recipe = _recipe(tiny_parts, manifests, "model.lora=encoder", *codec, *(f"data.augment.{k}={v}" for k, v in {
        "noise": "{p: 0.8}", "gain": "{p: 0.5}", "speed": "{p: 0.5}", "band": "{p: 0.3}", "reverb": "{p: 0.3}",
        "specaugment": "{p: 1.0, time_masks: 2, time_width: 0.05, freq_masks: 2, freq_width: 8}"}.items()))
    parts = listening_parts(recipe, torch.device("cpu"))
    tb, eb = parts.train_batches, parts.eval_batches
    idx = [0, 1, 2, 3]
    first = tb(idx)["input_features"]
    assert torch.equal(first, tb(idx)["input_features"])
    assert torch.equal(first, listening_parts(recipe, torch.device("cpu")).train_batches(idx)["input_features"])  # a fresh run: the same
    tb.epoch = 1
    second = tb(idx)["input_features"]
    assert first.shape != second.shape or not torch.equal(first, second)
    clean = tb.processor.featurize([eb.dataset[i]["audio"] for i in idx])["input_features"]
    assert torch.equal(eb(idx)["input_features"], clean)  # eval: never augmented
    # Two batches an epoch: the third step is epoch 1's, and the loop tells the batcher so.
    built = []
    monkeypatch.setattr(trainer, "listening_parts", lambda *a: built.append(listening_parts(*a)) or built[-1])
    summary = trainer.train(recipe.__class__(recipe.model, recipe.data, dataclasses.replace(recipe.train, batch_size=32, max_steps=3)),
                            tmp_path / "run")
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"]) and built[0].train_batches.epoch == 1


def test_a_cached_encoder_hears_a_different_copy_each_epoch(tiny_parts, manifests):
    """Frozen encoder (outputs cached once): data.augment.copies renders and encodes 3 augmented
    copies of each clip; epochs 0, 1, 2 hear different ones and epoch 3 the first again; eval's
    cache holds the clean clips; SpecAugment masks the cached frames, anew each epoch."""
    from earful.train.listening import listening_parts

    recipe = _recipe(tiny_parts, manifests, "data.augment.copies=3", "data.augment.noise={p: 1.0, snr_db: [0, 10], kinds: [white, babble]}")
    parts = listening_parts(recipe, torch.device("cpu"))
    tb, eb = parts.train_batches, parts.eval_batches
    n = len(tb.dataset)
    assert len(tb.cache) == 3 * n and len(eb.cache) == len(eb.dataset)
    idx = list(range(8))
    seen = []
    for epoch in range(4):
        tb.epoch = epoch
        seen.append(tb(idx)["audio_hidden_states"])
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2]) and not torch.equal(seen[0], seen[2])
    assert torch.equal(seen[0], seen[3])
    for i in idx:  # each clip's three copies all differ
        a, b, c = (tb.cache[i, k] for k in range(3))
        assert not torch.equal(a, b) and not torch.equal(b, c)
    clean = tb.processor.featurize([eb.dataset[0]["audio"]])
    with torch.no_grad():
        hidden, _ = tb.model.encode_audio(clean["input_features"], clean["input_features_mask"])
    torch.testing.assert_close(eb.cache[0, 0], hidden[0], rtol=1e-5, atol=1e-5)

    masked = listening_parts(_recipe(tiny_parts, manifests, "data.augment.specaugment={p: 1.0, time_masks: 1, time_width: 0.2, "
                                     "freq_masks: 1, freq_width: 8}"), torch.device("cpu")).train_batches
    assert masked.copies == 1 and len(masked.cache) == n
    a = masked(idx)["audio_hidden_states"]
    masked.epoch = 1
    assert not torch.equal(a, masked(idx)["audio_hidden_states"])
    plain = masked.cache[0, 0]
    h = a[0, : plain.shape[0]]
    channels = (h != plain).all(0).sum()  # one band of 8/80 of the 32 channels: at most 3
    assert 1 <= channels <= 3
