"""A small spoken StoryCloze-style set, synthesised with the bundled Piper voice.

Each story is a short context and two endings. Two kinds of pair, as in Hassid et al. (2023):
    sStoryCloze  the right ending vs. one written to contradict the story (needs understanding)
    tStoryCloze  the right ending vs. the right ending of another story (a topic change)
Each pair's two clips are the whole story spoken with each ending; the correct one comes first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# (context, right ending, wrong ending)
STORIES = [
    ("Anna was thirsty after her run. She opened the fridge.", "She drank a cold glass of water.", "She put on her winter coat and went to sleep."),
    ("Tom lost his keys on the way home. He searched every pocket.", "He finally found them in his jacket.", "He was happy that his keys were never lost."),
    ("The baby started to cry at night. Her father woke up.", "He picked her up and sang a song.", "He was glad the baby was always silent."),
    ("It began to rain heavily. Mark had forgotten his umbrella.", "He got completely wet on the way to work.", "He stayed perfectly dry in the sun."),
    ("Lisa baked a chocolate cake. She invited her friends.", "They ate the whole cake together.", "She had never baked anything in her life."),
    ("The dog saw a cat in the garden. It started to bark.", "The cat ran up a tree.", "The dog had never seen an animal before."),
    ("Sam studied hard for his math test. He slept well the night before.", "He passed the test with a good grade.", "He forgot that he had no test at all."),
    ("Our car ran out of gas on the highway. We called for help.", "A truck came and brought us fuel.", "We drove home quickly with a full tank."),
    ("Maria planted tomato seeds in spring. She watered them every day.", "By summer she had many red tomatoes.", "She never planted anything that year."),
    ("Ben missed the last bus. It was late and cold.", "He walked home in the dark.", "He took the last bus home."),
    ("The phone rang during dinner. Kate went to answer it.", "It was her mother calling to say hello.", "Nobody in the house had a phone."),
    ("Jack wanted to learn the guitar. He bought one online.", "He practiced every evening after work.", "He decided to sell the piano he never had."),
]


def story_text(context: str, ending: str) -> str:
    return f"{context} {ending}"


def build_spoken_storycloze(out_dir: str | Path, limit: int | None = None, sampling_rate: int = 16000) -> Path:
    """Synthesise the stories into OUT_DIR/audio/ and write OUT_DIR/pairs.jsonl; returns its path.

    Deterministic voice settings (no noise), so a rebuild gives the same audio.
    """
    from .synth import PiperVoice, synthesize_to_file

    out_dir = Path(out_dir)
    audio = out_dir / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    stories = STORIES[:limit] if limit else STORIES
    if len(stories) < 2:
        raise ValueError("a StoryCloze set needs at least 2 stories (tStoryCloze borrows another story's ending)")
    voice = PiperVoice.load()
    kw = dict(sampling_rate=sampling_rate, voice=voice, noise_scale=0.0, noise_w=0.0)
    rows = []
    for i, (context, right, wrong) in enumerate(tqdm(stories, desc="synthesising stories", unit="story")):
        other = stories[(i + 1) % len(stories)][1]  # the next story's right ending
        files = {}
        for kind, ending in (("right", right), ("wrong", wrong), ("topic", other)):
            path = audio / f"story{i:02d}_{kind}.wav"
            synthesize_to_file(story_text(context, ending), path, **kw)
            files[kind] = path.relative_to(out_dir).as_posix()
        rows.append({"id": f"story{i:02d}_s", "group": "sStoryCloze", "correct": files["right"], "wrong": files["wrong"],
                     "text_correct": story_text(context, right), "text_wrong": story_text(context, wrong)})
        rows.append({"id": f"story{i:02d}_t", "group": "tStoryCloze", "correct": files["right"], "wrong": files["topic"],
                     "text_correct": story_text(context, right), "text_wrong": story_text(context, other)})
    pairs = out_dir / "pairs.jsonl"
    tmp = pairs.with_name(pairs.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(pairs)
    logger.info("wrote %d pairs from %d stories to %s", len(rows), len(stories), pairs)
    return pairs
