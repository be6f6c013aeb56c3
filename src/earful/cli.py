"""`earful <stage> <verb>`: every stage of a speech LM's life from the command line.

Each verb is a plain function; its docstring is its help. Errors in what the user gave (a bad
audio file, recipe, manifest or model spec) print one line and exit with status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("earful")


class UsageError(Exception):
    """A problem with what the user gave, reported in one line."""


# -- verbs --------------------------------------------------------------------------------------
def data_prepare_fsdd(folder: str, out: str, speakers: str | None = None) -> None:
    """Build a manifest from FSDD-style recordings named {digit}_{speaker}_{index}.wav.

    The transcript is the digit's English word. --speakers a,b keeps only those speakers.
    """
    from .data.fsdd import fsdd_utterances
    from .data.manifest import write_manifest

    wanted = [s.strip() for s in speakers.split(",") if s.strip()] if speakers else None
    try:
        rows = fsdd_utterances(folder, wanted)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    n = write_manifest(rows, out)
    hours = sum(r.duration or 0 for r in rows) / 3600
    print(f"wrote {out}: {n} utterances, {len({r.speaker for r in rows})} speakers, {hours * 60:.1f} min of audio")


def data_prepare_tts_digits(out_dir: str, per_digit: int = 20, seed: int = 0) -> None:
    """Synthesise spoken digits with the bundled Piper voice (for machines without FSDD).

    Writes OUT_DIR/recordings/{digit}_piper{v}_{i}.wav at varied speed and noise (v names the
    setting, as a pseudo-speaker) and OUT_DIR/manifest.jsonl.
    """
    from .data.tts_digits import synthesise_digits

    manifest = synthesise_digits(out_dir, per_digit=per_digit, seed=seed)
    print(f"wrote {manifest}")


def train_cmd(recipe: str, out: str, set: list[str] | None = None, resume: bool = False) -> None:
    """Train a listening LM per a YAML recipe; OUT becomes a save_pretrained model folder.

    --set section.key=value overrides the recipe (e.g. --set train.max_steps=3 data.train=M.jsonl).
    --resume continues from OUT/checkpoint.pt exactly where it stopped.
    """
    from .train.recipe import load_recipe
    from .train.trainer import train

    summary = train(load_recipe(recipe, set or []), out, resume=resume)
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s "
          f"(final loss {summary['final_loss']:.4f}, eval loss {summary['eval_loss'] if summary['eval_loss'] is None else round(summary['eval_loss'], 4)}); model saved to {out}")


def eval_asr(model: str, data: str, out: str, batch_size: int = 16, prompt: str | None = None, limit: int | None = None) -> None:
    """Transcribe a manifest and write corpus WER/CER (Whisper-normalised) to a JSON report."""
    from .data.manifest import read_manifest
    from .eval.asr import evaluate_asr, write_report
    from .models.build import load_speech_lm

    utts = read_manifest(data)[:limit] if limit else read_manifest(data)
    lm, processor = load_speech_lm(model)
    report = evaluate_asr(lm, processor, utts, prompt=prompt or processor.prompt_format.default_prompt, batch_size=batch_size)
    report = {"model": str(model), "data": str(data), **report}
    write_report(report, out)
    print(f"WER {report['wer']:.4f}  CER {report['cer']:.4f}  accuracy {report['accuracy']:.4f}  "
          f"on {report['n']} utterances ({report['rejected']} rejected) -> {out}")


def _load_clips(files: list[str], sampling_rate: int) -> tuple[list, list[str], int]:
    from .audio import AudioError, load_audio

    waves, names, failures = [], [], 0
    for f in files:
        try:
            waves.append(load_audio(f, sampling_rate))
            names.append(f)
        except AudioError as e:
            print(f"error: {e} [{type(e).__name__}]", file=sys.stderr)
            failures += 1
    return waves, names, failures


def transcribe(model: str, files: list[str], prompt: str | None = None, batch_size: int = 8) -> int:
    """Print 'FILE<TAB>transcript' for each audio file. Unreadable files are reported and skipped."""
    from .eval.asr import generate_text
    from .models.build import load_speech_lm
    from .models.processing import SpeechLMProcessor

    # Check every file before paying for the model; the processor says which rate it wants.
    sr = SpeechLMProcessor.from_pretrained_sampling_rate(model)
    waves, names, failures = _load_clips(files, sr)
    if waves:
        lm, processor = load_speech_lm(model)
        for start in range(0, len(waves), batch_size):
            texts = generate_text(lm, processor, waves[start : start + batch_size], prompt or processor.prompt_format.default_prompt)
            for name, text in zip(names[start : start + batch_size], texts):
                print(f"{name}\t{text}")
    return 1 if failures else 0


def chat(model: str, audio: str, prompt: str | None = None, max_new_tokens: int = 128, sample: bool = False,
         temperature: float = 0.7, num_beams: int = 1) -> int:
    """Answer a prompt about one audio clip. The prompt may place <|audio|>; otherwise audio comes first."""
    from .data.dataset import AUDIO_TOKEN
    from .eval.asr import generate_text
    from .models.build import load_speech_lm
    from .models.processing import SpeechLMProcessor

    sr = SpeechLMProcessor.from_pretrained_sampling_rate(model)
    waves, _, failures = _load_clips([audio], sr)
    if failures:
        return 1
    lm, processor = load_speech_lm(model)
    text = prompt or processor.prompt_format.default_prompt
    if AUDIO_TOKEN not in text:
        text = f"{AUDIO_TOKEN}\n{text}"
    kwargs = {"do_sample": True, "temperature": temperature} if sample else {"num_beams": num_beams}
    print(generate_text(lm, processor, waves, text, max_new_tokens=max_new_tokens, **kwargs)[0])
    return 0


# -- argument parsing ---------------------------------------------------------------------------
def _doc(fn) -> str:
    return (fn.__doc__ or "").strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="earful", description="Turn a pretrained text LLM into a speech LM: data, training, evaluation, use.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")

    data = stages.add_parser("data", help="build manifests from audio").add_subparsers(dest="verb", required=True, metavar="VERB")
    prep = data.add_parser("prepare", help="build a manifest from a known corpus").add_subparsers(dest="corpus", required=True, metavar="CORPUS")
    s = prep.add_parser("fsdd", help=_doc(data_prepare_fsdd).splitlines()[0], description=_doc(data_prepare_fsdd))
    s.add_argument("folder", help="folder of recordings (or its parent holding recordings/)")
    s.add_argument("--out", required=True, help="manifest to write (JSON Lines)")
    s.add_argument("--speakers", help="comma-separated speakers to keep")
    s.set_defaults(fn=lambda a: data_prepare_fsdd(a.folder, a.out, a.speakers))
    s = prep.add_parser("tts-digits", help=_doc(data_prepare_tts_digits).splitlines()[0], description=_doc(data_prepare_tts_digits))
    s.add_argument("out_dir")
    s.add_argument("--per-digit", type=int, default=20, help="clips per digit (default 20)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=lambda a: data_prepare_tts_digits(a.out_dir, a.per_digit, a.seed))

    s = stages.add_parser("train", help=_doc(train_cmd).splitlines()[0], description=_doc(train_cmd))
    s.add_argument("recipe", help="YAML recipe (see recipes/)")
    s.add_argument("--out", required=True, help="output folder: the trained model, logs, checkpoints")
    s.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="override recipe fields")
    s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    s.set_defaults(fn=lambda a: train_cmd(a.recipe, a.out, a.set, a.resume))

    ev = stages.add_parser("eval", help="evaluate a model").add_subparsers(dest="verb", required=True, metavar="VERB")
    s = ev.add_parser("asr", help=_doc(eval_asr).splitlines()[0], description=_doc(eval_asr))
    s.add_argument("--model", required=True, help="trained model folder")
    s.add_argument("--data", required=True, help="manifest with transcripts")
    s.add_argument("--out", required=True, help="JSON report to write")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--prompt", help="user turn holding <|audio|> (default: the training prompt)")
    s.add_argument("--limit", type=int, help="score only the first N utterances")
    s.set_defaults(fn=lambda a: eval_asr(a.model, a.data, a.out, a.batch_size, a.prompt, a.limit))

    s = stages.add_parser("transcribe", help=_doc(transcribe).splitlines()[0], description=_doc(transcribe))
    s.add_argument("--model", required=True)
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--prompt")
    s.add_argument("--batch-size", type=int, default=8)
    s.set_defaults(fn=lambda a: transcribe(a.model, a.files, a.prompt, a.batch_size))

    s = stages.add_parser("chat", help=_doc(chat).splitlines()[0], description=_doc(chat))
    s.add_argument("--model", required=True)
    s.add_argument("--audio", required=True)
    s.add_argument("--prompt", help="what to ask (default: transcribe)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--num-beams", type=int, default=1)
    s.set_defaults(fn=lambda a: chat(a.model, a.audio, a.prompt, a.max_new_tokens, a.sample, a.temperature, a.num_beams))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers' own notices drown the run's progress
    hf_logging.disable_progress_bar()

    from .audio import AudioError
    from .data.manifest import ManifestError
    from .pretrained import ModelSpecError
    from .train.recipe import RecipeError

    try:
        return args.fn(args) or 0
    except (UsageError, AudioError, ManifestError, ModelSpecError, RecipeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
