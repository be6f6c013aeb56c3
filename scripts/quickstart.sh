#!/usr/bin/env bash
# The main job on the embedded default: set up, then train a listening LM on spoken digits
# (Whisper tiny.en with LoRA adapters + frozen SmolLM2-135M-Instruct + a trained projector), evaluate it on a
# held-out speaker, and transcribe a few clips. Minutes on 2 CPU cores; no hub, nothing to bring.
# Real speech comes from ../shared/data/fsdd (or $EARFUL_FSDD); without it, digits are
# synthesised with the bundled Piper voice.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
E=.venv/bin/earful
OUT=${OUT:-runs/digits}
FSDD=${EARFUL_FSDD:-../shared/data/fsdd}
mkdir -p "$OUT"
if [ -d "$FSDD/recordings" ]; then
  # george is held out: never heard in training, and never used to choose the recipe (benchmarks/heldout_speaker.py).
  echo "== data: FSDD at $FSDD (train on 4 speakers, evaluate on george, never heard in training)"
  TRAIN=$OUT/train.jsonl EVAL=$OUT/eval.jsonl
  $E data prepare fsdd "$FSDD" --out "$TRAIN" --speakers jackson,lucas,nicolas,yweweler
  $E data prepare fsdd "$FSDD" --out "$EVAL" --speakers george
  SAMPLES=("$FSDD/recordings/3_george_7.wav" "$FSDD/recordings/8_george_21.wav" "$FSDD/recordings/0_george_42.wav")
else
  echo "== data: no FSDD at $FSDD; synthesising spoken digits with the bundled Piper voice"
  $E data prepare tts-digits "$OUT/tts_train" --per-digit 20 --seed 0
  $E data prepare tts-digits "$OUT/tts_eval" --per-digit 5 --seed 1
  TRAIN=$OUT/tts_train/manifest.jsonl EVAL=$OUT/tts_eval/manifest.jsonl
  SAMPLES=("$OUT"/tts_eval/recordings/3_*_0.wav "$OUT"/tts_eval/recordings/8_*_1.wav)
fi
echo "== train (progress below; the model lands in $OUT/model)"
$E train recipes/digits.yaml --out "$OUT/model" --set data.train="$TRAIN" data.eval="$EVAL"
echo "== evaluate on the held-out manifest"
$E eval asr --model "$OUT/model" --data "$EVAL" --out "$OUT/eval_report.json"
echo "== transcribe a sample, and sounds that hold no speech (mains hum, music-like tones: the recipe's fixed answer)"
$E data prepare nonspeech "$OUT/nonspeech" --count 7 --seed 99
$E transcribe --model "$OUT/model" "${SAMPLES[@]}" "$OUT/nonspeech/audio/nonspeech_hum_00002.wav" "$OUT/nonspeech/audio/nonspeech_music_00005.wav"
